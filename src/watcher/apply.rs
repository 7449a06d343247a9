//! Apply: one source revision's specs become app and deployment rows, in one transaction.
//!
//! Shared by the watcher and `berth apply`/`berth plan`. [`plan`] is a pure diff of what is
//! loaded against a snapshot of the rows; [`apply`] computes the same diff inside the
//! transaction (after taking the apply lock) and carries it out.
//!
//! Invariants:
//! - an unchanged spec (same canonical hash) writes nothing, so it raises no event;
//! - an invalid spec never touches the app's spec or deployments, only `spec_error`/status;
//! - apps of a file that failed to parse are kept, never deleted;
//! - a source that suddenly yields no app at all is refused unless `prune_empty` is set;
//! - an app name belongs to one source; a domain to one app.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::spec::{AppSpec, Loaded};

/// Serializes applies across processes (a watcher and a CLI `apply` at once).
const APPLY_LOCK: i64 = 0x6265_7274_6810;

/// One source revision, loaded and validated.
pub struct SourceSnapshot {
    /// `folder:/abs/path` or `git:url#branch:path`: who owns the apps it defines.
    pub source: String,
    /// A content hash (folders) or the commit id (Git).
    pub revision: String,
    /// The root the files are relative to (their path inside the source is recorded).
    pub root: PathBuf,
    pub loaded: Loaded,
    /// The content hash of each `build:` app's context, by app name.
    pub builds: HashMap<String, String>,
}

impl SourceSnapshot {
    /// A snapshot of `loaded`, with the content hash of each `build:` app's context.
    pub fn new(source: String, revision: String, root: PathBuf, loaded: Loaded) -> SourceSnapshot {
        let builds = loaded
            .apps
            .iter()
            .filter_map(|app| {
                let build = app.spec.build.as_ref()?;
                let dir = app
                    .file
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(&build.context);
                // A context that cannot be read still deploys: its build fails, saying why.
                let hash = crate::builder::context::content_hash(&dir)
                    .unwrap_or_else(|e| format!("unreadable: {e}"));
                Some((app.spec.name.clone(), hash))
            })
            .collect();
        SourceSnapshot {
            source,
            revision,
            root,
            loaded,
            builds,
        }
    }

    /// The revision, changed by any change of a build context as well (a folder's revision
    /// hashes only its spec files).
    pub fn with_builds_in_revision(mut self) -> SourceSnapshot {
        use sha2::{Digest, Sha256};
        if self.builds.is_empty() {
            return self;
        }
        let mut builds: Vec<(&String, &String)> = self.builds.iter().collect();
        builds.sort();
        let mut hasher = Sha256::new();
        hasher.update(self.revision.as_bytes());
        for (name, hash) in builds {
            hasher.update([0]);
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(hash.as_bytes());
        }
        self.revision = revision_of(&hasher.finalize());
        self
    }

    /// What tells whether an app changed: its spec's hash, combined with its build
    /// context's for a `build:` app, so that new code is a new deployment as a new spec is.
    pub fn app_hash(&self, spec: &AppSpec) -> String {
        use sha2::{Digest, Sha256};
        let spec_hash = spec.spec_hash();
        match self.builds.get(&spec.name) {
            None => spec_hash,
            Some(context) => {
                let digest = Sha256::digest(format!("{spec_hash}\0{context}").as_bytes());
                digest.iter().map(|b| format!("{b:02x}")).collect()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Allow a source that had apps to become empty (deleting them all).
    pub prune_empty: bool,
}

/// What an apply does to one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    Create {
        name: String,
    },
    Update {
        name: String,
        fields: Vec<String>,
    },
    Delete {
        name: String,
    },
    /// The spec is invalid (or claimed by another source): the app keeps its last good spec.
    Invalid {
        name: String,
        error: String,
    },
    /// Only the recorded error or file changes (an invalid spec was fixed back to the
    /// running version): no new deployment.
    Clear {
        name: String,
    },
    Unchanged {
        name: String,
    },
}

impl Change {
    pub fn name(&self) -> &str {
        match self {
            Change::Create { name }
            | Change::Update { name, .. }
            | Change::Delete { name }
            | Change::Invalid { name, .. }
            | Change::Clear { name }
            | Change::Unchanged { name } => name,
        }
    }

    /// Whether it changes the desired state (what `plan` exits 1 for).
    pub fn is_change(&self) -> bool {
        !matches!(self, Change::Unchanged { .. })
    }
}

/// The diff of a source against the rows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub source: String,
    pub revision: String,
    pub changes: Vec<Change>,
    /// Spec problems (`file:line:col: field: message`).
    pub errors: Vec<String>,
    /// Why the whole apply was refused, if it was.
    pub refused: Option<String>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.changes.iter().any(Change::is_change)
    }
}

/// A row of `apps` as the diff needs it.
#[derive(Debug, Clone)]
struct AppRow {
    id: i64,
    spec_hash: Option<String>,
    source: String,
    source_file: Option<String>,
    deleted: bool,
    spec_error: Option<String>,
}

struct Snapshot {
    apps: HashMap<String, AppRow>,
    /// hostname -> owning app name
    domains: HashMap<String, String>,
}

async fn snapshot(db: &mut sqlx::PgConnection) -> Result<Snapshot, sqlx::Error> {
    let rows = sqlx::query(
        "select id, name, spec_hash, source, source_file, deleted_at is not null as deleted, spec_error from apps",
    )
    .fetch_all(&mut *db)
    .await?;
    let apps = rows
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>("name"),
                AppRow {
                    id: r.get("id"),
                    spec_hash: r.get("spec_hash"),
                    source: r.get("source"),
                    source_file: r.get("source_file"),
                    deleted: r.get("deleted"),
                    spec_error: r.get("spec_error"),
                },
            )
        })
        .collect();
    let domains =
        sqlx::query("select d.hostname, a.name from domains d join apps a on a.id = d.app_id")
            .fetch_all(&mut *db)
            .await?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect();
    Ok(Snapshot { apps, domains })
}

fn relative(root: &Path, file: &Path) -> String {
    file.strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string()
}

/// Computes the diff. `old_specs` gives the stored spec of apps whose hash changed, for the
/// list of changed fields.
fn diff(
    snap: &Snapshot,
    src: &SourceSnapshot,
    opts: ApplyOptions,
    old_specs: &HashMap<String, serde_json::Value>,
) -> Plan {
    let mut plan = Plan {
        source: src.source.clone(),
        revision: src.revision.clone(),
        errors: src.loaded.errors.iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    };
    let loaded = &src.loaded;
    let valid: HashSet<&str> = loaded.apps.iter().map(|a| a.spec.name.as_str()).collect();
    let invalid: HashSet<&str> = loaded
        .invalid_names
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let failed_files: HashSet<String> = loaded
        .errors
        .iter()
        .map(|e| relative(&src.root, &e.file))
        .collect();
    // Apps of this source that this apply deletes: their domains are free to take.
    let leaving: HashSet<&str> = snap
        .apps
        .iter()
        .filter(|(name, row)| {
            row.source == src.source
                && !row.deleted
                && !valid.contains(name.as_str())
                && !invalid.contains(name.as_str())
                && !row
                    .source_file
                    .as_ref()
                    .is_some_and(|f| failed_files.contains(f))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    // A domain is free for `app` if nobody holds it, `app` does, or an app of this same
    // source holds it that this apply changes or deletes.
    let domain_free = |app: &str, domain: &String| match snap.domains.get(domain) {
        None => true,
        Some(owner) if owner == app => true,
        Some(owner) => {
            snap.apps
                .get(owner)
                .is_some_and(|row| row.source == src.source)
                && (valid.contains(owner.as_str()) || leaving.contains(owner.as_str()))
        }
    };

    for app in &loaded.apps {
        let name = app.spec.name.clone();
        seen.insert(name.clone());
        let existing = snap.apps.get(&name);
        if let Some(row) = existing
            && row.source != src.source
            && !row.deleted
        {
            let error = format!(
                "{}: app `{name}` is already defined by source {}; it keeps that definition",
                relative(&src.root, &app.file),
                row.source
            );
            plan.errors.push(error.clone());
            plan.changes.push(Change::Invalid { name, error });
            continue;
        }
        let taken: Vec<&String> = app
            .spec
            .domains
            .iter()
            .filter(|d| !domain_free(&name, d))
            .collect();
        if let Some(domain) = taken.first() {
            let error = format!(
                "{}: domain `{domain}` is already used by app `{}`",
                relative(&src.root, &app.file),
                snap.domains[*domain]
            );
            plan.errors.push(error.clone());
            plan.changes.push(Change::Invalid { name, error });
            continue;
        }
        let hash = src.app_hash(&app.spec);
        let file = relative(&src.root, &app.file);
        plan.changes.push(match existing {
            None => Change::Create { name },
            Some(row) if row.deleted || row.spec_hash.is_none() => Change::Create { name },
            Some(row) if row.spec_hash.as_deref() != Some(hash.as_str()) => {
                let mut fields = old_specs
                    .get(&name)
                    .map(|old| changed_fields(old, &app.spec.to_canonical_json()))
                    .unwrap_or_default();
                if fields.is_empty() && src.builds.contains_key(&name) {
                    // The same spec: what changed is in the build context.
                    fields.push("build context".to_string());
                }
                Change::Update { name, fields }
            }
            Some(row)
                if row.spec_error.is_some()
                    || row.source_file.as_deref() != Some(file.as_str()) =>
            {
                Change::Clear { name }
            }
            Some(_) => Change::Unchanged { name },
        });
    }

    // Files that failed as a whole (syntax, unreadable) keep the apps they defined.
    let mut file_errors: HashMap<String, String> = HashMap::new();
    for e in &loaded.errors {
        file_errors
            .entry(relative(&src.root, &e.file))
            .or_insert_with(|| e.to_string());
    }
    for (name, error) in &loaded.invalid_names {
        if !seen.insert(name.clone()) {
            continue;
        }
        match snap.apps.get(name) {
            Some(row) if row.source != src.source && !row.deleted => continue,
            _ => plan.changes.push(Change::Invalid {
                name: name.clone(),
                error: error.to_string(),
            }),
        }
    }
    let mut live_in_source = 0;
    let mut names: Vec<&String> = snap.apps.keys().collect();
    names.sort();
    for name in names {
        let row = &snap.apps[name];
        if row.source != src.source || row.deleted {
            continue;
        }
        live_in_source += 1;
        if seen.contains(name) {
            continue;
        }
        match row.source_file.as_ref().and_then(|f| file_errors.get(f)) {
            Some(error) => plan.changes.push(Change::Invalid {
                name: name.clone(),
                error: error.clone(),
            }),
            None => plan.changes.push(Change::Delete { name: name.clone() }),
        }
    }
    let yields_nothing =
        loaded.apps.is_empty() && loaded.invalid_names.is_empty() && loaded.errors.is_empty();
    if yields_nothing && live_in_source > 0 && !opts.prune_empty {
        plan.refused = Some(format!(
            "source {} yields no app but {live_in_source} app(s) came from it: refusing to delete them all \
             (set prune_empty to allow it)",
            src.source
        ));
    }
    plan.changes.sort_by(|a, b| a.name().cmp(b.name()));
    plan
}

/// Dotted paths of the fields that differ between two canonical specs.
pub fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(
        prefix: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
        out: &mut BTreeSet<String>,
    ) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y))
                if !prefix.starts_with("env") =>
            {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(&path, p, q, out),
                        _ => {
                            out.insert(path);
                        }
                    }
                }
            }
            _ if a != b => {
                out.insert(prefix.to_string());
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk("", old, new, &mut out);
    out.into_iter().collect()
}

async fn old_specs_of<'e, E>(
    db: E,
    snap: &Snapshot,
    src: &SourceSnapshot,
) -> Result<HashMap<String, serde_json::Value>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let ids: Vec<i64> = src
        .loaded
        .apps
        .iter()
        .filter_map(|a| {
            let row = snap.apps.get(&a.spec.name)?;
            (row.spec_hash.as_deref() != Some(src.app_hash(&a.spec).as_str())).then_some(row.id)
        })
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(
        sqlx::query("select name, spec from apps where id = any($1) and spec is not null")
            .bind(&ids)
            .fetch_all(db)
            .await?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<serde_json::Value, _>(1)))
            .collect(),
    )
}

/// What an apply of `src` would do, read from the current rows. Writes nothing.
pub async fn plan(
    pool: &PgPool,
    src: &SourceSnapshot,
    opts: ApplyOptions,
) -> Result<Plan, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let snap = snapshot(&mut conn).await?;
    let old = old_specs_of(&mut *conn, &snap, src).await?;
    Ok(diff(&snap, src, opts, &old))
}

/// Applies `src` in one transaction and returns what it did. A refused apply writes only
/// the source's status.
pub async fn apply(
    pool: &PgPool,
    src: &SourceSnapshot,
    opts: ApplyOptions,
) -> Result<Plan, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(APPLY_LOCK)
        .execute(&mut *tx)
        .await?;
    let snap = snapshot(&mut tx).await?;
    let old = old_specs_of(&mut *tx, &snap, src).await?;
    let plan = diff(&snap, src, opts, &old);
    if plan.refused.is_none() {
        execute(&mut tx, &snap, src, &plan).await?;
    }
    record_source(&mut tx, src, &plan).await?;
    tx.commit().await?;
    Ok(plan)
}

async fn record_source(
    tx: &mut Transaction<'_, Postgres>,
    src: &SourceSnapshot,
    plan: &Plan,
) -> Result<(), sqlx::Error> {
    let error = match (&plan.refused, plan.errors.is_empty()) {
        (Some(r), _) => Some(r.clone()),
        (None, true) => None,
        (None, false) => Some(plan.errors.join("\n")),
    };
    let count = plan
        .changes
        .iter()
        .filter(|c| !matches!(c, Change::Delete { .. }))
        .count() as i32;
    sqlx::query(
        "insert into sources (name, revision, error, app_count, applied_at) values ($1, $2, $3, $4, now())
         on conflict (name) do update set revision = excluded.revision, error = excluded.error,
             app_count = excluded.app_count, applied_at = excluded.applied_at
         where (sources.revision, sources.error, sources.app_count) is distinct from
               (excluded.revision, excluded.error, excluded.app_count)",
    )
    .bind(&src.source)
    .bind(&src.revision)
    .bind(error)
    .bind(count)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn timeline_entry(step: &str, message: &str) -> serde_json::Value {
    serde_json::json!([{ "at": chrono::Utc::now(), "step": step, "message": message }])
}

async fn cancel_in_flight(
    tx: &mut Transaction<'_, Postgres>,
    app_id: i64,
    why: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update deployments set status = 'cancelled', cancelled_at = now(), timeline = timeline || $2
         where app_id = $1 and status in ('pending', 'building', 'deploying')",
    )
    .bind(app_id)
    .bind(timeline_entry("cancelled", why))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn execute(
    tx: &mut Transaction<'_, Postgres>,
    snap: &Snapshot,
    src: &SourceSnapshot,
    plan: &Plan,
) -> Result<(), sqlx::Error> {
    let specs: HashMap<&str, (&AppSpec, String)> = src
        .loaded
        .apps
        .iter()
        .map(|a| {
            (
                a.spec.name.as_str(),
                (&a.spec, relative(&src.root, &a.file)),
            )
        })
        .collect();

    // The existing apps this apply changes, locked in id order before any is written: the
    // manager locks its batches of apps in id order too, so the two never deadlock (each
    // taking rows in its own order could).
    let touched: Vec<i64> = plan
        .changes
        .iter()
        .filter(|c| c.is_change())
        .filter_map(|c| snap.apps.get(c.name()).map(|r| r.id))
        .collect();
    if !touched.is_empty() {
        sqlx::query("select id from apps where id = any($1) order by id for no key update")
            .bind(&touched)
            .fetch_all(&mut **tx)
            .await?;
    }

    // Domains first leave the apps that lose them, so a domain can move between two apps of
    // one apply without tripping the unique constraint.
    let releasing: Vec<i64> = plan
        .changes
        .iter()
        .filter(|c| {
            matches!(
                c,
                Change::Update { .. } | Change::Delete { .. } | Change::Create { .. }
            )
        })
        .filter_map(|c| snap.apps.get(c.name()).map(|r| r.id))
        .collect();
    if !releasing.is_empty() {
        sqlx::query("delete from domains where app_id = any($1)")
            .bind(&releasing)
            .execute(&mut **tx)
            .await?;
    }

    // Creates in bulk: 10,000 new apps are three statements, not 30,000.
    let mut new_names = Vec::new();
    let mut new_specs = Vec::new();
    let mut new_hashes = Vec::new();
    let mut new_files = Vec::new();
    let mut recreate = Vec::new();
    for change in &plan.changes {
        if let Change::Create { name } = change {
            let (spec, file) = &specs[name.as_str()];
            match snap.apps.get(name) {
                Some(row) => recreate.push((row.id, *spec, file.clone())),
                None => {
                    new_names.push(name.clone());
                    new_specs.push(spec.to_canonical_json());
                    new_hashes.push(src.app_hash(spec));
                    new_files.push(file.clone());
                }
            }
        }
    }
    let mut upserted: Vec<(i64, i64, &AppSpec)> = Vec::new();
    if !new_names.is_empty() {
        let rows = sqlx::query(
            "insert into apps (name, spec, spec_hash, generation, source, source_file, source_revision, status)
             select n, s, h, 1, $5, f, $6, '{\"ready\": false, \"reason\": \"Progressing\", \"message\": \"deployment pending\"}'
             from unnest($1::text[], $2::jsonb[], $3::text[], $4::text[]) as t(n, s, h, f)
             returning id, name",
        )
        .bind(&new_names)
        .bind(&new_specs)
        .bind(&new_hashes)
        .bind(&new_files)
        .bind(&src.source)
        .bind(&src.revision)
        .fetch_all(&mut **tx)
        .await?;
        for r in rows {
            let name: String = r.get(1);
            upserted.push((r.get(0), 1, specs[name.as_str()].0));
        }
    }
    for (id, spec, file) in recreate {
        let generation: i64 = sqlx::query_scalar(
            "update apps set spec = $2, spec_hash = $3, generation = generation + 1, source = $4, source_file = $5,
                 source_revision = $6, spec_error = null, deleted_at = null,
                 status = '{\"ready\": false, \"reason\": \"Progressing\", \"message\": \"deployment pending\"}'
             where id = $1 returning generation",
        )
        .bind(id)
        .bind(spec.to_canonical_json())
        .bind(src.app_hash(spec))
        .bind(&src.source)
        .bind(&file)
        .bind(&src.revision)
        .fetch_one(&mut **tx)
        .await?;
        upserted.push((id, generation, spec));
    }

    for change in &plan.changes {
        match change {
            Change::Update { name, .. } => {
                let (spec, file) = &specs[name.as_str()];
                let id = snap.apps[name].id;
                let generation: i64 = sqlx::query_scalar(
                    "update apps set spec = $2, spec_hash = $3, generation = generation + 1, source_file = $4,
                         source_revision = $5, spec_error = null,
                         status = jsonb_build_object('ready', coalesce((status->>'ready')::boolean, false),
                             'reason', 'Progressing', 'message', 'deployment pending')
                     where id = $1 returning generation",
                )
                .bind(id)
                .bind(spec.to_canonical_json())
                .bind(src.app_hash(spec))
                .bind(file)
                .bind(&src.revision)
                .fetch_one(&mut **tx)
                .await?;
                cancel_in_flight(tx, id, &format!("superseded by generation {generation}")).await?;
                upserted.push((id, generation, *spec));
            }
            Change::Delete { name } => {
                let id = snap.apps[name].id;
                sqlx::query(
                    "update apps set deleted_at = now(),
                         status = '{\"ready\": false, \"reason\": \"Deleted\", \"message\": \"the spec left its source\"}'
                     where id = $1",
                )
                .bind(id)
                .execute(&mut **tx)
                .await?;
                cancel_in_flight(tx, id, "the app was deleted").await?;
            }
            Change::Invalid { name, error } => match snap.apps.get(name) {
                Some(row) if row.source == src.source || row.deleted => {
                    sqlx::query(
                        "update apps set spec_error = $2,
                             status = jsonb_build_object('ready', coalesce((status->>'ready')::boolean, false),
                                 'reason', 'InvalidSpec', 'message', $2::text)
                         where id = $1 and spec_error is distinct from $2",
                    )
                    .bind(row.id)
                    .bind(error)
                    .execute(&mut **tx)
                    .await?;
                }
                Some(_) => {}
                None => {
                    sqlx::query(
                        "insert into apps (name, source, spec_error, status)
                         values ($1, $2, $3, jsonb_build_object('ready', false, 'reason', 'InvalidSpec', 'message', $3::text))",
                    )
                    .bind(name)
                    .bind(&src.source)
                    .bind(error)
                    .execute(&mut **tx)
                    .await?;
                }
            },
            Change::Clear { name } => {
                let (_, file) = &specs[name.as_str()];
                sqlx::query(
                    "update apps set spec_error = null, source_file = $2,
                         status = case when status->>'reason' = 'InvalidSpec'
                             then jsonb_build_object('ready', coalesce((status->>'ready')::boolean, false),
                                 'reason', 'Progressing', 'message', '')
                             else status end
                     where id = $1",
                )
                .bind(snap.apps[name].id)
                .bind(file)
                .execute(&mut **tx)
                .await?;
            }
            Change::Create { .. } | Change::Unchanged { .. } => {}
        }
    }

    if !upserted.is_empty() {
        let mut app_ids = Vec::new();
        let mut generations = Vec::new();
        let mut spec_json = Vec::new();
        let mut hashes = Vec::new();
        let mut timelines = Vec::new();
        let mut domain_apps = Vec::new();
        let mut domain_names = Vec::new();
        for (id, generation, spec) in &upserted {
            app_ids.push(*id);
            generations.push(*generation);
            spec_json.push(spec.to_canonical_json());
            hashes.push(src.app_hash(spec));
            timelines.push(timeline_entry(
                "pending",
                &format!("generation {generation} from revision {}", src.revision),
            ));
            for d in &spec.domains {
                domain_apps.push(*id);
                domain_names.push(d.clone());
            }
        }
        sqlx::query(
            "insert into deployments (app_id, generation, spec, spec_hash, source_revision, timeline)
             select a, g, s, h, $5, t from unnest($1::bigint[], $2::bigint[], $3::jsonb[], $4::text[], $6::jsonb[]) as x(a, g, s, h, t)",
        )
        .bind(&app_ids)
        .bind(&generations)
        .bind(&spec_json)
        .bind(&hashes)
        .bind(&src.revision)
        .bind(&timelines)
        .execute(&mut **tx)
        .await?;
        if !domain_names.is_empty() {
            sqlx::query("insert into domains (app_id, hostname) select * from unnest($1::bigint[], $2::text[])")
                .bind(&domain_apps)
                .bind(&domain_names)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// The content hash of a folder's spec files: the revision of a folder source.
pub fn folder_revision(root: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut loaded_files = Vec::new();
    let mut visited = Vec::new();
    let _ = crate::spec::collect_spec_files(root, &mut loaded_files, &mut visited);
    loaded_files.sort();
    let mut hasher = Sha256::new();
    for f in loaded_files {
        hasher.update(relative(root, &f).as_bytes());
        hasher.update([0]);
        hasher.update(std::fs::read(&f).unwrap_or_default());
        hasher.update([0]);
    }
    revision_of(&hasher.finalize())
}

/// A revision string from a SHA-256 digest: `sha256:` and its first 16 bytes in hex.
pub fn revision_of(digest: &[u8]) -> String {
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_fields_are_dotted_paths() {
        let a = serde_json::json!({"replicas": 1, "deploy": {"max_surge": 1, "strategy": "rolling"}, "env": {"A": "1"}});
        let b = serde_json::json!({"replicas": 2, "deploy": {"max_surge": 2, "strategy": "rolling"}, "env": {"A": "2"}, "port": 80});
        assert_eq!(
            changed_fields(&a, &b),
            vec!["deploy.max_surge", "env", "port", "replicas"]
        );
    }
}
