//! Catalog queries: table shapes, keys, types, publications and slots.

use std::collections::HashMap;

use ferry_schemas::{Column, ColumnType, TableId, TableSchema};
use tokio_postgres::Client;

use super::{quote_ident, quote_literal};

/// What the catalog says about one type.
#[derive(Clone, Debug)]
pub struct TypeInfo {
    /// `typname` for `pg_catalog` types, else `schema.typname`.
    pub name: String,
    /// How values of this type are represented.
    pub ty: ColumnType,
}

fn builtin(name: &str) -> Option<ColumnType> {
    Some(match name {
        "int2" => ColumnType::Int2,
        "int4" => ColumnType::Int4,
        "int8" => ColumnType::Int8,
        "float4" => ColumnType::Float4,
        "float8" => ColumnType::Float8,
        "bool" => ColumnType::Bool,
        "numeric" => ColumnType::Numeric,
        "text" | "varchar" | "bpchar" | "name" | "char" => ColumnType::Text,
        "bytea" => ColumnType::Bytea,
        "date" => ColumnType::Date,
        "time" => ColumnType::Time,
        "timestamp" => ColumnType::Timestamp,
        "timestamptz" => ColumnType::TimestampTz,
        "uuid" => ColumnType::Uuid,
        "json" | "jsonb" => ColumnType::Json,
        _ => return None,
    })
}

fn scalar_type(namespace: &str, name: &str, typtype: &str) -> ColumnType {
    if typtype == "e" {
        return ColumnType::Enum;
    }
    if namespace == "pg_catalog" {
        if let Some(t) = builtin(name) {
            return t;
        }
    }
    ColumnType::Other
}

/// Resolves type oids to Ferry column types with one catalog query.
pub async fn resolve_types(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, TypeInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT t.oid, t.typname::text, n.nspname::text, t.typtype::text, t.typcategory::text, \
                    e.typname::text, en.nspname::text, e.typtype::text, e.typcategory::text \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' \
             LEFT JOIN pg_namespace en ON en.oid = e.typnamespace \
             WHERE t.oid = ANY($1)",
            &[&oids],
        )
        .await?;
    let mut out = HashMap::new();
    for row in rows {
        let oid: u32 = row.get(0);
        let name: String = row.get(1);
        let ns: String = row.get(2);
        let typtype: String = row.get(3);
        let elem: Option<String> = row.get(5);
        let ty = match elem {
            Some(elem) => {
                let elem_ns: String = row.get(6);
                let elem_type: String = row.get(7);
                let elem_cat: String = row.get(8);
                if elem_cat == "A" {
                    ColumnType::Other
                } else {
                    ColumnType::Array(Box::new(scalar_type(&elem_ns, &elem, &elem_type)))
                }
            }
            None => scalar_type(&ns, &name, &typtype),
        };
        let name = if ns == "pg_catalog" {
            name
        } else {
            format!("{ns}.{name}")
        };
        out.insert(oid, TypeInfo { name, ty });
    }
    Ok(out)
}

/// A table's oid, looked up by name; `None` when it does not exist.
pub async fn table_oid(
    client: &Client,
    table: &TableId,
) -> Result<Option<u32>, tokio_postgres::Error> {
    let qualified = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.table)
    );
    let row = client
        .query_one("SELECT to_regclass($1)::oid", &[&qualified])
        .await?;
    Ok(row.get::<_, Option<u32>>(0))
}

/// The replicated columns of a table (as pgoutput sends them: not dropped, not generated), in
/// order, with their type oids and modifiers.
pub async fn table_columns(
    client: &Client,
    relid: u32,
) -> Result<Vec<(String, u32, i32)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
             ORDER BY attnum",
            &[&relid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Whether any of `columns` of `table` has a default.
pub async fn any_default(
    client: &Client,
    table: &TableId,
    columns: &[String],
) -> Result<bool, tokio_postgres::Error> {
    let qualified = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.table)
    );
    let row = client
        .query_one(
            "SELECT coalesce(bool_or(atthasdef), false) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = ANY($2)",
            &[&qualified, &columns],
        )
        .await?;
    Ok(row.get(0))
}

/// What a publication publishes of a table (Postgres 15+: a column list and a row filter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// The published columns (`None`: every column).
    pub columns: Option<Vec<String>>,
    /// The row filter, as SQL (`None`: every row).
    pub row_filter: Option<String>,
}

impl Published {
    /// Keeps the published columns of `columns` (as [`table_columns`] lists them).
    pub fn keep(&self, columns: Vec<(String, u32, i32)>) -> Vec<(String, u32, i32)> {
        match &self.columns {
            Some(names) => columns
                .into_iter()
                .filter(|(n, _, _)| names.contains(n))
                .collect(),
            None => columns,
        }
    }
}

/// The column list and row filter `publication` has for `table`, so snapshots and backfills
/// read exactly what the stream sends. Before Postgres 15 there are neither.
pub async fn published(
    client: &Client,
    publication: &str,
    table: &TableId,
) -> Result<Published, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.table],
        )
        .await;
    match row {
        Ok(Some(r)) => Ok(Published {
            columns: r.get(0),
            row_filter: r.get(1),
        }),
        Ok(None) => Ok(Published::default()),
        // Postgres 14 and older: no column lists, no row filters.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
            Ok(Published::default())
        }
        Err(e) => Err(e),
    }
}

/// Key columns in declared order (the order of the key's index): the primary key, else the
/// replica identity index, else nothing.
pub async fn key_columns(
    client: &Client,
    relid: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, i.indisprimary FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
             ORDER BY i.indisprimary DESC, k.n",
            &[&relid],
        )
        .await?;
    let primary: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    if !primary.is_empty() {
        return Ok(primary);
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Builds a table schema version from column names and type oids, resolving types and keys
/// from the catalog. The snapshot and the stream both build through here, so the same shape
/// always yields the same schema (and fingerprint).
pub async fn build_schema(
    client: &Client,
    database: &str,
    id: TableId,
    relid: u32,
    columns: &[(String, u32, i32)],
) -> Result<TableSchema, tokio_postgres::Error> {
    build_schema_at(client, database, id, relid, columns, None).await
}

/// [`build_schema`] with the column numbers the stream gave (`numbers`, by name: the DDL event
/// trigger's, exact at the change's place in the stream). A column they do not name gets
/// today's number for its name, trusted only while the type is still the one the change had;
/// a column without a number has no missing value either (it is looked up by number).
pub async fn build_schema_at(
    client: &Client,
    database: &str,
    id: TableId,
    relid: u32,
    columns: &[(String, u32, i32)],
    numbers: Option<&HashMap<String, i16>>,
) -> Result<TableSchema, tokio_postgres::Error> {
    let oids: Vec<u32> = columns.iter().map(|(_, oid, _)| *oid).collect();
    let types = resolve_types(client, &oids).await?;
    let keys = key_columns(client, relid).await?;
    // Today's catalog: number and type by name, and the value rows older than a column added
    // with a default hold (`attmissingval`), by number.
    let mut today: HashMap<String, (i16, u32)> = HashMap::new();
    let mut missing: HashMap<i16, String> = HashMap::new();
    for r in client
        .query(
            "SELECT attname::text, attnum, atttypid, attmissingval::text FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            &[&relid],
        )
        .await?
    {
        let (name, num, ty): (String, i16, u32) = (r.get(0), r.get(1), r.get(2));
        let text: Option<String> = r.get(3);
        // attmissingval is a one-element array of the column's type; its text is the value.
        let value = text.as_deref().and_then(|t| {
            match super::values::parse(t, &ColumnType::Array(Box::new(ColumnType::Text))) {
                Ok(ferry_schemas::Datum::Array(v)) => match v.into_iter().next()? {
                    ferry_schemas::Datum::Text(t) => Some(t),
                    _ => None,
                },
                _ => None,
            }
        });
        if let Some(v) = value {
            missing.insert(num, v);
        }
        today.insert(name, (num, ty));
    }
    let columns = columns
        .iter()
        .map(|(name, oid, type_mod)| {
            let info = types.get(oid);
            let attnum = numbers
                .and_then(|n| n.get(name).copied())
                .or_else(|| today.get(name).filter(|(_, ty)| ty == oid).map(|(n, _)| *n));
            Column {
                name: name.clone(),
                pg_type: info.map_or_else(|| format!("oid {oid}"), |t| t.name.clone()),
                type_oid: *oid,
                type_mod: *type_mod,
                missing: attnum.and_then(|n| missing.get(&n).cloned()),
                attnum,
                ty: info.map_or(ColumnType::Other, |t| t.ty.clone()),
                key: keys.contains(name),
                key_order: keys.iter().position(|k| k == name).map_or(0, |p| p as u16),
            }
        })
        .collect();
    Ok(TableSchema {
        database: database.to_string(),
        id,
        columns,
    })
}

/// The tables a publication covers.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<TableId>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Whether a publication exists.
pub async fn publication_exists(
    client: &Client,
    publication: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Every ordinary and partitioned table outside the system schemas: what a publication
/// `FOR ALL TABLES` would take in.
pub async fn user_tables(client: &Client) -> Result<Vec<TableId>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// What [`ensure_publication`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publication {
    /// It exists (tables listed but missing from it were added).
    Ready,
    /// It does not exist and nothing says which tables it should hold.
    NoTables,
}

/// The prefix of the logical message the DDL event trigger writes (see [`install_ddl_trigger`]).
pub const COLUMNS_MESSAGE: &str = "ferry.columns";

/// Installs (or replaces) the event trigger `ferry_columns` and its function
/// `ferry_ddl.columns()` (its own schema: a schema named `ferry` would catch the unqualified
/// tables of a role named `ferry`, through `search_path = "$user", public`): at the end of every `ALTER TABLE`, it writes a transactional logical
/// message `ferry.columns` with the altered table's oid and its columns' numbers and names
/// (`{"relid": 16384, "columns": [[1, "id"], [3, "renamed"]]}`), so capture learns each
/// column's identity at the DDL's place in the stream. It never makes the DDL fail (without
/// logical WAL or the right to emit messages it writes nothing). A DDL inside a savepoint is
/// sent at the end of its transaction (Postgres decodes a subtransaction's messages after its
/// parent's changes). Needs superuser.
pub async fn install_ddl_trigger(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS ferry_ddl;
             CREATE OR REPLACE FUNCTION ferry_ddl.columns() RETURNS event_trigger
             LANGUAGE plpgsql SET search_path = pg_catalog AS $fn$
             DECLARE r record;
             BEGIN
               -- Never make the user's DDL fail (no message then; a rename read late may arrive
               -- as a new column). No EXCEPTION block: it would open a subtransaction, and
               -- logical decoding sends a subtransaction's messages after the changes of its
               -- parent, past the changes they describe.
               IF current_setting('wal_level') <> 'logical' OR NOT has_function_privilege(
                    'pg_logical_emit_message(boolean, text, text)', 'EXECUTE') THEN
                 RETURN;
               END IF;
               FOR r IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
                        WHERE classid = 'pg_class'::regclass
                          AND object_type IN ('table', 'table column') LOOP
                 PERFORM pg_logical_emit_message(true, {prefix}, json_build_object(
                   'relid', r.objid::bigint,
                   'columns', (SELECT json_agg(json_build_array(attnum, attname) ORDER BY attnum)
                               FROM pg_attribute
                               WHERE attrelid = r.objid AND attnum > 0 AND NOT attisdropped))::text);
               END LOOP;
             END $fn$;
             DROP EVENT TRIGGER IF EXISTS ferry_columns;
             CREATE EVENT TRIGGER ferry_columns ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
               EXECUTE FUNCTION ferry_ddl.columns();",
            prefix = quote_literal(COLUMNS_MESSAGE)
        ))
        .await
}

/// Whether the DDL event trigger is installed and enabled.
pub async fn has_ddl_trigger(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_event_trigger WHERE evtname = 'ferry_columns' AND evtenabled <> 'D'",
            &[],
        )
        .await?
        .is_some())
}

/// Creates the publication when missing: for the listed tables, or (`all_tables`) for all
/// tables when the list is empty. Tables listed but missing from an existing publication are
/// added.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableId],
    all_tables: bool,
) -> Result<Publication, tokio_postgres::Error> {
    let list = tables
        .iter()
        .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table)))
        .collect::<Vec<_>>();
    if !publication_exists(client, publication).await? {
        let target = match (list.is_empty(), all_tables) {
            (false, _) => format!("FOR TABLE {}", list.join(", ")),
            (true, true) => "FOR ALL TABLES".to_string(),
            (true, false) => return Ok(Publication::NoTables),
        };
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} {target}",
                quote_ident(publication)
            ))
            .await?;
        return Ok(Publication::Ready);
    }
    let existing = publication_tables(client, publication).await?;
    let missing: Vec<String> = tables
        .iter()
        .zip(&list)
        .filter(|(t, _)| !existing.contains(t))
        .map(|(_, q)| q.clone())
        .collect();
    if !missing.is_empty() {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(publication),
                missing.join(", ")
            ))
            .await?;
    }
    Ok(Publication::Ready)
}

/// What UPDATE and DELETE on a table send, and so what capture can do with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableFacts {
    /// `d` (default: the primary key), `f` (full row), `i` (an index), `n` (nothing).
    pub replica_identity: char,
    /// Whether the table has a primary key.
    pub has_primary_key: bool,
    /// Whether the current role may SELECT it (snapshots and backfills read it).
    pub can_select: bool,
}

impl TableFacts {
    /// What replicating UPDATE and DELETE will do, and whether that is a problem: Postgres
    /// refuses them on a table that publishes them without a replica identity.
    pub fn updates(&self) -> (bool, &'static str) {
        match (self.replica_identity, self.has_primary_key) {
            ('d', true) => (true, "updates and deletes match by primary key"),
            ('i', _) => (true, "updates and deletes match by the replica identity index"),
            ('f', true) => (true, "updates and deletes match by primary key (replica identity full)"),
            ('f', false) => (true, "no key: updates and deletes match the full old row"),
            _ => (
                false,
                "no primary key and no replica identity: Postgres refuses UPDATE and DELETE on it                  while it is in the publication, and Ferry replicates inserts only;                  ALTER TABLE … REPLICA IDENTITY FULL (or add a primary key)",
            ),
        }
    }
}

/// A table's replica identity, primary key and SELECT grant; `None` when it does not exist.
pub async fn table_facts(
    client: &Client,
    table: &TableId,
) -> Result<Option<TableFacts>, tokio_postgres::Error> {
    let qualified = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.table)
    );
    let row = client
        .query_opt(
            "SELECT c.relreplident::text,                     EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),                     has_table_privilege(c.oid, 'SELECT')              FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&qualified],
        )
        .await?;
    Ok(row.map(|r| TableFacts {
        replica_identity: r.get::<_, String>(0).chars().next().unwrap_or('d'),
        has_primary_key: r.get(1),
        can_select: r.get(2),
    }))
}

/// A replication slot's state.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    /// The output plugin (Ferry needs `pgoutput`).
    pub plugin: Option<String>,
    /// The database the slot belongs to.
    pub database: Option<String>,
    /// Whether a session is streaming from it now.
    pub active: bool,
    /// The last position the consumer confirmed.
    pub confirmed_flush_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL the slot holds back.
    pub retained_bytes: Option<i64>,
    /// Bytes of WAL that can still be written before the slot is in danger of being
    /// invalidated (`None` without a `max_slot_wal_keep_size` limit).
    pub safe_wal_bytes: Option<i64>,
    /// The server's `max_slot_wal_keep_size` in bytes (-1: no limit).
    pub keep_limit_bytes: Option<i64>,
}

impl SlotInfo {
    /// Why Postgres may soon invalidate this slot, if it may: its WAL is past
    /// `max_slot_wal_keep_size` (`unreserved`), or less than a quarter of that limit is left.
    pub fn at_risk(&self) -> Option<String> {
        let limit = self.keep_limit_bytes.filter(|&l| l > 0)?;
        let mb = |b: i64| b as f64 / (1024.0 * 1024.0);
        if self.wal_status.as_deref() == Some("unreserved") {
            return Some(format!(
                "slot retains more WAL than max_slot_wal_keep_size ({:.0} MiB): Postgres will \
                 invalidate it at the next checkpoint unless capture catches up now",
                mb(limit)
            ));
        }
        let safe = self.safe_wal_bytes?;
        (safe < limit / 4).then(|| {
            format!(
                "slot is {:.1} MiB of WAL away from invalidation (max_slot_wal_keep_size {:.0} MiB, \
                 retained {:.1} MiB): resume capture before it is lost",
                mb(safe.max(0)),
                mb(limit),
                mb(self.retained_bytes.unwrap_or(0))
            )
        })
    }
}

/// Looks a replication slot up.
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text, wal_status, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size, \
                    pg_size_bytes(current_setting('max_slot_wal_keep_size')) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush_lsn: r.get(3),
        wal_status: r.get(4),
        retained_bytes: r.get(5),
        safe_wal_bytes: r.get(6),
        keep_limit_bytes: r.get(7),
    }))
}

/// Drops a replication slot (waiting for it to be released if a session still holds it).
pub async fn drop_slot(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot({}) FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(name),
            quote_literal(name)
        ))
        .await
}

/// Server settings and privileges that capture depends on.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    /// `server_version`.
    pub version: String,
    /// `wal_level`.
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// Slots in use.
    pub slots_used: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// Whether the current user may replicate (REPLICATION attribute or superuser).
    pub can_replicate: bool,
    /// Whether the current user is a superuser.
    pub superuser: bool,
    /// `server_encoding` of the database.
    pub server_encoding: String,
}

/// Reads [`ServerFacts`].
pub async fn server_facts(client: &Client) -> Result<ServerFacts, tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level'), \
                    current_setting('max_replication_slots')::bigint, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    current_setting('max_wal_senders')::bigint, \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                    current_setting('server_encoding')",
            &[],
        )
        .await?;
    Ok(ServerFacts {
        version: r.get(0),
        wal_level: r.get(1),
        max_replication_slots: r.get(2),
        slots_used: r.get(3),
        max_wal_senders: r.get(4),
        can_replicate: r.get(5),
        superuser: r.get(6),
        server_encoding: r.get(7),
    })
}
