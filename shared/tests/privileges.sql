-- Every privilege the application roles hold in this database, one line each: grants on tables,
-- columns, functions, the schema and the database (PUBLIC's included, since they apply to every
-- role), ownership, row-level security policies, role attributes, memberships and settings.
-- shared/tests/privileges.rs compares the result with its reviewed list.
WITH roles(oid, name) AS (
    SELECT oid, rolname::text FROM pg_catalog.pg_roles
     WHERE rolname IN ('meterbridge_api', 'meterbridge_ingest', 'meterbridge_payments',
                       'meterbridge_ops', 'meterbridge_definer')
    UNION ALL SELECT 0, 'PUBLIC'
), relations AS (
    SELECT c.oid, c.relname, c.relkind, c.relowner, c.relacl
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
)
SELECT r.name || ': ' || a.privilege_type || ' ON TABLE ' || c.relname
  FROM relations c
 CROSS JOIN LATERAL pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault(
         (CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char", c.relowner))) a
  JOIN roles r ON r.oid = a.grantee
UNION ALL
SELECT r.name || ': ' || a.privilege_type || ' ON COLUMN ' || c.relname || '.' || att.attname
  FROM relations c
  JOIN pg_catalog.pg_attribute att ON att.attrelid = c.oid AND att.attacl IS NOT NULL
 CROSS JOIN LATERAL pg_catalog.aclexplode(att.attacl) a
  JOIN roles r ON r.oid = a.grantee
UNION ALL
SELECT r.name || ': ' || a.privilege_type || ' ON FUNCTION ' || p.oid::pg_catalog.regprocedure::text
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
 CROSS JOIN LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f'::"char", p.proowner))) a
  JOIN roles r ON r.oid = a.grantee
 WHERE n.nspname = 'public'
UNION ALL
SELECT r.name || ': ' || a.privilege_type || ' ON SCHEMA ' || n.nspname
  FROM pg_catalog.pg_namespace n
 CROSS JOIN LATERAL pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n'::"char", n.nspowner))) a
  JOIN roles r ON r.oid = a.grantee
 WHERE n.nspname = 'public'
UNION ALL
SELECT r.name || ': ' || a.privilege_type || ' ON DATABASE'
  FROM pg_catalog.pg_database d
 CROSS JOIN LATERAL pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d'::"char", d.datdba))) a
  JOIN roles r ON r.oid = a.grantee
 WHERE d.datname = pg_catalog.current_database()
UNION ALL
SELECT r.name || ': OWNER OF ' || CASE c.relkind WHEN 'S' THEN 'SEQUENCE ' ELSE 'TABLE ' END || c.relname
  FROM relations c JOIN roles r ON r.oid = c.relowner
UNION ALL
SELECT r.name || ': OWNER OF FUNCTION ' || p.oid::pg_catalog.regprocedure::text
  FROM pg_catalog.pg_proc p JOIN roles r ON r.oid = p.proowner
UNION ALL
SELECT r.name || ': POLICY ' || pol.polname || ' ' ||
       CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                       WHEN 'd' THEN 'DELETE' ELSE 'ALL' END ||
       ' ON ' || c.relname ||
       coalesce(' USING ' || pg_catalog.pg_get_expr(pol.polqual, pol.polrelid), '') ||
       coalesce(' WITH CHECK ' || pg_catalog.pg_get_expr(pol.polwithcheck, pol.polrelid), '')
  FROM pg_catalog.pg_policy pol JOIN relations c ON c.oid = pol.polrelid
 CROSS JOIN LATERAL pg_catalog.unnest(pol.polroles) AS pr(oid)
  JOIN roles r ON r.oid = pr.oid
UNION ALL
SELECT r.name || ': ROLE ' ||
       concat_ws(' ', CASE WHEN rl.rolcanlogin THEN 'LOGIN' ELSE 'NOLOGIN' END,
                 CASE WHEN rl.rolsuper THEN 'SUPERUSER' END, CASE WHEN rl.rolbypassrls THEN 'BYPASSRLS' END,
                 CASE WHEN rl.rolcreatedb THEN 'CREATEDB' END, CASE WHEN rl.rolcreaterole THEN 'CREATEROLE' END,
                 CASE WHEN rl.rolreplication THEN 'REPLICATION' END)
  FROM pg_catalog.pg_roles rl JOIN roles r ON r.oid = rl.oid
UNION ALL
SELECT r.name || ': MEMBER OF ' || g.rolname
  FROM pg_catalog.pg_auth_members m JOIN roles r ON r.oid = m.member
  JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
UNION ALL
SELECT r.name || ': SET ' || s.setting
  FROM pg_catalog.pg_db_role_setting st
  JOIN pg_catalog.pg_database d ON d.oid = st.setdatabase AND d.datname = pg_catalog.current_database()
  JOIN roles r ON r.oid = st.setrole
 CROSS JOIN LATERAL pg_catalog.unnest(st.setconfig) AS s(setting)
ORDER BY 1;
