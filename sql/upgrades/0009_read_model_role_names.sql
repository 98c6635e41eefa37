-- Migration 0009, data: read model roles get unambiguous names
-- (<projector role>/<schema>, aura.read_model_role_name) and the shadow and
-- rebuild schemas roles of their own. Before 0009 a role was
-- named <projector role>_<schema without __shadow/__rebuild>: a shadow's
-- handlers ran as the live model's role, and projector shop's read model
-- eu_totals got the role of projector shop_eu's totals.
--
-- roles/read_model_roles.sql (rerun first) gave the schemas of the
-- projections' rows to their new roles; this gives every other read model
-- schema of this database (SCHEMA__previous, kept by a rebuild) to the role
-- of its name, then retires the old roles: a pre-0009 role (commented
-- exactly 'aura-pg read model role') of which this database's projector
-- role is a member and that owns nothing here any more loses its default
-- privileges here and is dropped, unless a database not migrated yet
-- still uses it (DROP ROLE refuses then; the last migration drops it).
-- Rerunning this file changes nothing.
DO $$
DECLARE
    v_projector text := (SELECT n.role_name FROM aura.role_names n WHERE n.kind = 'projector');
    r record;
BEGIN
    FOR r IN SELECT n.nspname FROM pg_catalog.pg_namespace n
             WHERE pg_catalog.obj_description(n.oid, 'pg_namespace') = 'aura-pg read model'
               AND n.nspname ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*(__[a-z]+)?$'
               AND char_length(n.nspname) <= 60
             ORDER BY n.nspname LOOP
        PERFORM aura.hand_over_read_model(r.nspname);
    END LOOP;

    FOR r IN SELECT old.oid, old.rolname FROM pg_catalog.pg_roles old
             JOIN pg_catalog.pg_auth_members m ON m.roleid = old.oid
             JOIN pg_catalog.pg_roles p ON p.oid = m.member AND p.rolname = v_projector
             WHERE pg_catalog.shobj_description(old.oid, 'pg_authid') = 'aura-pg read model role'
               AND NOT old.rolcanlogin
               -- Nothing here but its default privileges (and grants to it).
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend d
                               WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = old.oid
                                 AND d.dbid = (SELECT x.oid FROM pg_catalog.pg_database x
                                               WHERE x.datname = current_database())
                                 AND d.deptype = 'o'
                                 AND d.classid <> 'pg_default_acl'::regclass)
             ORDER BY old.rolname LOOP
        EXECUTE format('DROP OWNED BY %I', r.rolname);
        BEGIN
            EXECUTE format('DROP ROLE %I', r.rolname);
        EXCEPTION WHEN dependent_objects_still_exist OR undefined_object THEN
            RAISE NOTICE 'kept the pre-0009 read model role %: another database still uses it', r.rolname;
        END;
    END LOOP;
END
$$;
