//! The app spec (DESIGN §4): types, parsing and validation.
//!
//! A spec file holds one or more YAML documents, each one app. Loading never stops at the
//! first problem: every document is checked and every problem is returned as a [`SpecError`]
//! naming file, line, column and field path, so `berth validate` and the watcher can report
//! them all while the valid apps go on.
//!
//! Invariants:
//! - an [`AppSpec`] that left this module is valid: names are DNS labels, hostnames are
//!   lowercase, the build context is inside the source root;
//! - [`AppSpec::spec_hash`] depends only on meaning: key order, formatting and defaults written
//!   out or left implicit give the same hash.

mod types;
pub mod units;
pub mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use types::*;
use yaml::{Node, PathSeg, Pos};

/// A problem in a spec file, located for a person to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The file as the user named it (relative paths stay relative).
    pub file: PathBuf,
    pub pos: Pos,
    /// Dotted field path (`deploy.max_surge`), or `yaml` for syntax problems, `file` for
    /// problems with the file itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.pos.line,
            self.pos.col,
            self.field,
            self.message
        )
    }
}

/// A valid app and where it was defined.
#[derive(Debug, Clone)]
pub struct LoadedApp {
    pub spec: AppSpec,
    pub file: PathBuf,
    /// Where the document starts.
    pub pos: Pos,
    /// The parsed document, kept to locate problems found later (duplicates across files).
    pub doc: Node,
}

/// The result of loading specs: the valid apps and every problem found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub apps: Vec<LoadedApp>,
    pub errors: Vec<SpecError>,
    /// Names of apps whose document failed validation (known only when the name itself was
    /// readable), so a watcher can mark exactly those apps InvalidSpec.
    pub invalid_names: Vec<(String, SpecError)>,
}

/// Loads specs from files or folders. A folder is its own source root; a file's root is its
/// folder. Folders are walked recursively for `*.yaml` and `*.yml`, skipping hidden and
/// editor temporary files.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        if path.is_dir() {
            let mut files = Vec::new();
            let mut visited = Vec::new();
            if let Err(e) = collect_spec_files(path, &mut files, &mut visited) {
                loaded
                    .errors
                    .push(file_error(path, format!("cannot read folder: {e}")));
            }
            files.sort();
            for file in files {
                load_file(&file, path, &mut loaded);
            }
        } else if path.exists() {
            let root = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            load_file(path, &root, &mut loaded);
        } else {
            loaded
                .errors
                .push(file_error(path, "no such file or folder".into()));
        }
    }
    check_unique(&mut loaded);
    loaded
        .errors
        .sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
    loaded
}

/// True for names the watcher and loader never read: hidden files and editor leftovers.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name.starts_with(".#")
}

fn is_spec_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !is_ignored_name(name) && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

pub(crate) fn collect_spec_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    visited: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    // Symlinked folders are followed, but each real folder is read once: a link to an
    // ancestor must not loop forever.
    let real = dir.canonicalize()?;
    if visited.contains(&real) {
        return Ok(());
    }
    visited.push(real);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_str().is_none_or(is_ignored_name) {
            continue;
        }
        // Follow symlinks: a Nix-built source is a tree of links into the store.
        if path.is_dir() {
            collect_spec_files(&path, out, visited)?;
        } else if is_spec_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn file_error(file: &Path, message: String) -> SpecError {
    SpecError {
        file: file.to_path_buf(),
        pos: Pos { line: 1, col: 1 },
        field: "file".into(),
        message,
    }
}

/// Loads one file's documents into `loaded`.
pub fn load_file(file: &Path, root: &Path, loaded: &mut Loaded) {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            loaded
                .errors
                .push(file_error(file, format!("cannot read: {e}")));
            return;
        }
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let col = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            loaded.errors.push(SpecError {
                file: file.to_path_buf(),
                pos: Pos { line, col },
                field: "file".into(),
                message: "not a text file (invalid UTF-8)".into(),
            });
            return;
        }
    };
    if text.contains('\0') {
        loaded.errors.push(file_error(
            file,
            "not a text file (contains NUL bytes)".into(),
        ));
        return;
    }
    let docs = match yaml::load_documents(text) {
        Ok(d) => d,
        Err(e) => {
            loaded.errors.push(SpecError {
                file: file.to_path_buf(),
                pos: e.pos,
                field: "yaml".into(),
                message: e.message,
            });
            return;
        }
    };
    if docs.is_empty() {
        loaded.errors.push(file_error(
            file,
            "holds no app spec (the file is empty)".into(),
        ));
        return;
    }
    for doc in docs {
        match parse_document(&doc, file, root) {
            Ok(spec) => loaded.apps.push(LoadedApp {
                spec,
                file: file.to_path_buf(),
                pos: doc.pos,
                doc,
            }),
            Err(errors) => {
                if let Some(name) = readable_name(&doc) {
                    loaded.invalid_names.push((name, errors[0].clone()));
                }
                loaded.errors.extend(errors);
            }
        }
    }
}

/// The `name` of a document that failed, if it is a valid DNS label.
fn readable_name(doc: &Node) -> Option<String> {
    let json = doc.to_json();
    let name = json.get("name")?.as_str()?;
    validate_dns_label(name).is_ok().then(|| name.to_string())
}

/// Parses and validates one document.
fn parse_document(doc: &Node, file: &Path, root: &Path) -> Result<AppSpec, Vec<SpecError>> {
    let locate = |path: &[PathSeg], key: bool, message: String| SpecError {
        file: file.to_path_buf(),
        pos: doc.locate(path, key),
        field: if path.is_empty() {
            "(document)".into()
        } else {
            yaml::render_path(path)
        },
        message,
    };
    if !matches!(doc.kind, yaml::NodeKind::Map(_)) {
        return Err(vec![locate(
            &[],
            false,
            format!(
                "expected a mapping describing one app, found {}",
                doc.describe()
            ),
        )]);
    }
    let json = doc.to_json();
    let spec: AppSpec = match serde_path_to_error::deserialize(json) {
        Ok(s) => s,
        Err(e) => {
            let path = convert_path(e.path());
            let (path, key, message) = explain_serde_error(path, &e.inner().to_string());
            return Err(vec![locate(&path, key, message)]);
        }
    };
    let problems = validate(&spec, file, root);
    if problems.is_empty() {
        Ok(spec.normalized())
    } else {
        Err(problems
            .into_iter()
            .map(|(path, msg)| locate(&path, false, msg))
            .collect())
    }
}

fn convert_path(path: &serde_path_to_error::Path) -> Vec<PathSeg> {
    path.iter()
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Map { key } => Some(PathSeg::Field(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(PathSeg::Index(*index)),
            serde_path_to_error::Segment::Enum { variant } => Some(PathSeg::Field(variant.clone())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

/// Rewrites serde's messages into ones a person acts on: unknown fields get a suggestion
/// and point at the key, missing fields point at the mapping that lacks them.
fn explain_serde_error(mut path: Vec<PathSeg>, message: &str) -> (Vec<PathSeg>, bool, String) {
    let quoted: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    if message.starts_with("unknown field") {
        let unknown = quoted.first().copied().unwrap_or("");
        let expected = &quoted[1.min(quoted.len())..];
        if path.last() != Some(&PathSeg::Field(unknown.to_string())) {
            path.push(PathSeg::Field(unknown.to_string()));
        }
        let hint = suggest(unknown, expected)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .or_else(|| {
                (path.len() == 1)
                    .then(|| nested_home(unknown))
                    .flatten()
                    .map(|h| format!(" (did you mean `{h}.{unknown}`?)"))
            })
            .unwrap_or_else(|| format!(" (expected one of: {})", expected.join(", ")));
        return (path, true, format!("unknown field `{unknown}`{hint}"));
    }
    if message.starts_with("unknown variant") {
        let unknown = quoted.first().copied().unwrap_or("");
        let expected = &quoted[1.min(quoted.len())..];
        let hint = suggest(unknown, expected)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_else(|| format!(" (expected one of: {})", expected.join(", ")));
        return (path, false, format!("unknown value `{unknown}`{hint}"));
    }
    if message.starts_with("missing field") {
        let field = quoted.first().copied().unwrap_or("");
        return (path, false, format!("missing required field `{field}`"));
    }
    let message = message
        .replace("expected u32", "expected a whole number (0 or more)")
        .replace("expected u16", "expected a port number (1 to 65535)")
        .replace("expected f64", "expected a number");
    (path, false, message)
}

/// The section a top-level field probably belongs in (`strategy` -> `deploy`).
fn nested_home(field: &str) -> Option<&'static str> {
    Some(match field {
        "context" | "dockerfile" | "args" | "target" => "build",
        "path" | "interval" | "timeout" | "healthy_threshold" | "unhealthy_threshold" => "health",
        "strategy" | "max_surge" | "max_unavailable" | "drain_timeout" | "progress_deadline" => {
            "deploy"
        }
        "memory" | "cpus" => "resources",
        _ => return None,
    })
}

/// The closest known name, if it is close enough to be a typo.
pub fn suggest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| {
            (
                strsim::jaro_winkler(&unknown.to_lowercase(), &k.to_lowercase()),
                *k,
            )
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

fn field(name: &str) -> PathSeg {
    PathSeg::Field(name.to_string())
}

/// Checks meaning beyond types. Returns (field path, message) per problem.
fn validate(spec: &AppSpec, file: &Path, root: &Path) -> Vec<(Vec<PathSeg>, String)> {
    let mut problems = Vec::new();
    if spec.api_version != API_VERSION {
        problems.push((
            vec![field("apiVersion")],
            format!("must be `{API_VERSION}`"),
        ));
    }
    if spec.kind != "App" {
        problems.push((vec![field("kind")], "must be `App`".to_string()));
    }
    if let Err(e) = validate_dns_label(&spec.name) {
        problems.push((vec![field("name")], e));
    }
    let sources = [
        spec.build.is_some(),
        spec.image.is_some(),
        spec.runtime == Runtime::Exec,
    ];
    match sources.iter().filter(|s| **s).count() {
        1 => {}
        0 => problems.push((
            vec![],
            "needs exactly one of `build`, `image` or `runtime: exec`, found none".to_string(),
        )),
        _ => {
            let (path, what) = if spec.runtime == Runtime::Exec {
                (
                    if spec.build.is_some() {
                        "build"
                    } else {
                        "image"
                    },
                    "`runtime: exec` runs a program on the node and takes no `build` or `image`",
                )
            } else {
                (
                    "image",
                    "`build` and `image` are exclusive: give exactly one",
                )
            };
            problems.push((vec![field(path)], what.to_string()));
        }
    }
    if spec.runtime == Runtime::Exec && spec.command.as_ref().is_none_or(|c| c.is_empty()) {
        problems.push((
            vec![field("command")],
            "`runtime: exec` needs a `command` to run".to_string(),
        ));
    }
    if let Some(command) = &spec.command
        && command.is_empty()
    {
        problems.push((
            vec![field("command")],
            "must not be empty when given".to_string(),
        ));
    }
    if let Some(image) = &spec.image
        && (image.trim().is_empty() || image.contains(char::is_whitespace))
    {
        problems.push((
            vec![field("image")],
            "must be an image reference such as registry.example.com/app:1.2".to_string(),
        ));
    }
    if let Some(port) = spec.port
        && port == 0
    {
        problems.push((
            vec![field("port")],
            "must be between 1 and 65535".to_string(),
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            problems.push((
                vec![field("env"), field(key)],
                "is not a valid environment variable name".to_string(),
            ));
        }
    }
    let mut seen_domains = HashMap::new();
    for (i, domain) in spec.domains.iter().enumerate() {
        match normalize_hostname(domain) {
            Ok(host) => {
                if let Some(first) = seen_domains.insert(host.clone(), i) {
                    problems.push((
                        vec![field("domains"), PathSeg::Index(i)],
                        format!("`{host}` is listed twice (first at domains[{first}])"),
                    ));
                }
            }
            Err(e) => problems.push((vec![field("domains"), PathSeg::Index(i)], e)),
        }
    }
    if let Some(health) = &spec.health {
        if let Some(path) = &health.path
            && !path.starts_with('/')
        {
            problems.push((
                vec![field("health"), field("path")],
                "must start with `/`".to_string(),
            ));
        }
        if health.interval.0.is_zero() {
            problems.push((
                vec![field("health"), field("interval")],
                "must be greater than zero".to_string(),
            ));
        }
        if health.timeout.0.is_zero() {
            problems.push((
                vec![field("health"), field("timeout")],
                "must be greater than zero".to_string(),
            ));
        }
        if health.healthy_threshold == 0 {
            problems.push((
                vec![field("health"), field("healthy_threshold")],
                "must be at least 1".to_string(),
            ));
        }
        if health.unhealthy_threshold == 0 {
            problems.push((
                vec![field("health"), field("unhealthy_threshold")],
                "must be at least 1".to_string(),
            ));
        }
    }
    let deploy = &spec.deploy;
    if deploy.strategy == Strategy::Rolling && deploy.max_surge == 0 && deploy.max_unavailable == 0
    {
        problems.push((
            vec![field("deploy"), field("max_surge")],
            "`max_surge` and `max_unavailable` cannot both be 0: a rolling update could never make progress".to_string(),
        ));
    }
    if deploy.progress_deadline.0.is_zero() {
        problems.push((
            vec![field("deploy"), field("progress_deadline")],
            "must be greater than zero".to_string(),
        ));
    }
    if let Some(res) = &spec.resources {
        if let Some(cpus) = res.cpus
            && !(cpus > 0.0 && cpus.is_finite())
        {
            problems.push((
                vec![field("resources"), field("cpus")],
                "must be greater than zero".to_string(),
            ));
        }
        if let Some(mem) = res.memory
            && mem.0 < 6 << 20
        {
            problems.push((
                vec![field("resources"), field("memory")],
                "must be at least 6Mi (the Docker engine's minimum)".to_string(),
            ));
        }
    }
    if let Some(build) = &spec.build {
        problems.extend(validate_build(build, file, root));
    }
    problems
}

/// Build contexts may not leave the source root, whether by `..`, an absolute path or a
/// symlink; the dockerfile may not leave the context.
fn validate_build(build: &BuildSpec, file: &Path, root: &Path) -> Vec<(Vec<PathSeg>, String)> {
    let mut problems = Vec::new();
    let context_path = vec![field("build"), field("context")];
    if Path::new(&build.context).is_absolute() {
        problems.push((
            context_path,
            "must be relative to the spec file".to_string(),
        ));
        return problems;
    }
    let file_dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (root_real, context_real) = match (
        root.canonicalize(),
        file_dir.join(&build.context).canonicalize(),
    ) {
        (Ok(r), Ok(c)) => (r, c),
        (Err(e), _) => {
            problems.push((context_path, format!("cannot resolve the source root: {e}")));
            return problems;
        }
        (_, Err(_)) => {
            problems.push((context_path, format!("`{}` does not exist", build.context)));
            return problems;
        }
    };
    if !context_real.starts_with(&root_real) {
        problems.push((
            context_path,
            format!(
                "`{}` leaves the source root `{}`",
                build.context,
                root.display()
            ),
        ));
        return problems;
    }
    if !context_real.is_dir() {
        problems.push((context_path, format!("`{}` is not a folder", build.context)));
        return problems;
    }
    let dockerfile_path = vec![field("build"), field("dockerfile")];
    if Path::new(&build.dockerfile).is_absolute() {
        problems.push((
            dockerfile_path,
            "must be relative to the build context".to_string(),
        ));
        return problems;
    }
    match context_real.join(&build.dockerfile).canonicalize() {
        Ok(d) if !d.starts_with(&context_real) => problems.push((
            dockerfile_path,
            format!("`{}` leaves the build context", build.dockerfile),
        )),
        Ok(d) if !d.is_file() => problems.push((
            dockerfile_path,
            format!("`{}` is not a file", build.dockerfile),
        )),
        Ok(_) => {}
        Err(_) => problems.push((
            dockerfile_path,
            format!("`{}` does not exist in the build context", build.dockerfile),
        )),
    }
    problems
}

/// A DNS label: 1 to 63 lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn validate_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!("`{name}` is longer than 63 characters"));
    }
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("`{name}` must be lowercase (a DNS label)"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "`{name}` may only hold lowercase letters, digits and `-` (a DNS label)"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "`{name}` must not start or end with `-` (a DNS label)"
        ));
    }
    Ok(())
}

/// Lowercases a hostname and checks it; a single trailing dot is dropped. Ports, schemes,
/// paths and wildcards are refused.
pub fn normalize_hostname(host: &str) -> Result<String, String> {
    let lower = host.trim().to_ascii_lowercase();
    let h = lower.strip_suffix('.').unwrap_or(&lower);
    if h.contains("://") || h.contains('/') {
        return Err(format!(
            "`{host}` must be a bare hostname, without scheme or path"
        ));
    }
    if h.contains(':') {
        return Err(format!("`{host}` must not carry a port"));
    }
    if h.starts_with("*.") {
        return Err(format!("`{host}`: wildcard domains are not supported"));
    }
    if h.is_empty() || h.len() > 253 {
        return Err(format!(
            "`{host}` is not a valid hostname (1 to 253 characters)"
        ));
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "`{host}` is not a valid hostname (label `{label}`)"
            ));
        }
    }
    Ok(h.to_string())
}

/// Names and domains are unique across everything loaded together. The later definition is
/// reported, naming where the first one is.
fn check_unique(loaded: &mut Loaded) {
    let mut names: HashMap<String, (PathBuf, Pos)> = HashMap::new();
    let mut domains: HashMap<String, (String, PathBuf, Pos)> = HashMap::new();
    let mut keep = Vec::new();
    for app in std::mem::take(&mut loaded.apps) {
        let mut errors = Vec::new();
        let name_pos = |path: &[PathSeg]| app.doc.locate(path, false);
        if let Some((file, pos)) = names.get(&app.spec.name) {
            errors.push(SpecError {
                file: app.file.clone(),
                pos: name_pos(&[field("name")]),
                field: "name".into(),
                message: format!(
                    "app `{}` is already defined at {}:{}:{}",
                    app.spec.name,
                    file.display(),
                    pos.line,
                    pos.col
                ),
            });
        }
        for (i, domain) in app.spec.domains.iter().enumerate() {
            if let Some((other, file, pos)) = domains.get(domain)
                && (other != &app.spec.name || errors.is_empty())
            {
                errors.push(SpecError {
                    file: app.file.clone(),
                    pos: name_pos(&[field("domains"), PathSeg::Index(i)]),
                    field: format!("domains[{i}]"),
                    message: format!(
                        "domain `{domain}` is already used by app `{other}` at {}:{}:{}",
                        file.display(),
                        pos.line,
                        pos.col
                    ),
                });
            }
        }
        if errors.is_empty() {
            names.insert(
                app.spec.name.clone(),
                (app.file.clone(), app.doc.locate(&[field("name")], false)),
            );
            for (i, domain) in app.spec.domains.iter().enumerate() {
                domains.insert(
                    domain.clone(),
                    (
                        app.spec.name.clone(),
                        app.file.clone(),
                        app.doc
                            .locate(&[field("domains"), PathSeg::Index(i)], false),
                    ),
                );
            }
            keep.push(app);
        } else {
            loaded
                .invalid_names
                .push((app.spec.name.clone(), errors[0].clone()));
            loaded.errors.extend(errors);
        }
    }
    loaded.apps = keep;
}

#[cfg(test)]
mod tests;
