//! The build context as the Docker engine takes it: a tar of the context folder, without
//! what `.dockerignore` excludes, and refusing symlinks that point outside the context.

use std::path::{Component, Path, PathBuf};

/// A `.dockerignore` rule.
struct Rule {
    /// Path segments, each a glob (`*`, `?`), or `**` for any number of segments.
    segments: Vec<String>,
    /// `!pattern`: re-include.
    negate: bool,
}

/// The `.dockerignore` of a context: later rules win, as in Docker.
pub struct DockerIgnore {
    rules: Vec<Rule>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> DockerIgnore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negate, pattern) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let pattern = pattern
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .trim_end_matches('/');
                Rule {
                    segments: pattern
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                    negate,
                }
            })
            .collect();
        DockerIgnore { rules }
    }

    /// Whether `rel` (a path inside the context, `/`-separated) is excluded. A path is also
    /// excluded when one of its parent folders is.
    pub fn excludes(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for rule in &self.rules {
            // A rule matching the path or any of its parents applies.
            let hit = (1..=parts.len()).any(|n| match_segments(&rule.segments, &parts[..n]));
            if hit {
                excluded = !rule.negate;
            }
        }
        excluded
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(p), _) if p == "**" => {
            (0..=path.len()).any(|skip| match_segments(&pattern[1..], &path[skip..]))
        }
        (Some(p), Some(s)) => {
            glob(p.as_bytes(), s.as_bytes()) && match_segments(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Errors that make a context unusable.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("symlink `{0}` points outside the build context")]
    EscapingSymlink(String),
    #[error("build context `{0}` is not a folder")]
    NotAFolder(String),
    #[error("reading the build context: {0}")]
    Io(#[from] std::io::Error),
}

/// What an entry of a context is.
enum Entry {
    Dir,
    File,
    Symlink(PathBuf),
}

/// Visits what of `context` goes to the engine, in a fixed order (depth first, names sorted):
/// what `.dockerignore` excludes is left out, a symlink leading outside is an error.
fn walk(
    context: &Path,
    mut visit: impl FnMut(&Path, &Path, Entry, &std::fs::Metadata) -> std::io::Result<()>,
) -> Result<(), ContextError> {
    if !context.is_dir() {
        return Err(ContextError::NotAFolder(context.display().to_string()));
    }
    let real_root = context.canonicalize()?;
    let ignore = match std::fs::read_to_string(context.join(".dockerignore")) {
        Ok(t) => DockerIgnore::parse(&t),
        Err(_) => DockerIgnore::parse(""),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(context.join(&rel_dir))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel_dir.join(entry.file_name());
            let rel_str = rel.to_string_lossy().replace('\\', "/");
            // The Dockerfile and .dockerignore always go (the engine needs them), as Docker does.
            let essential = rel_str == "Dockerfile" || rel_str == ".dockerignore";
            if !essential && ignore.excludes(&rel_str) {
                continue;
            }
            let path = context.join(&rel);
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path)?;
                let resolved = if target.is_absolute() {
                    target.clone()
                } else {
                    path.parent().unwrap_or(context).join(&target)
                };
                if !stays_inside(&real_root, &resolved) {
                    return Err(ContextError::EscapingSymlink(rel_str));
                }
                visit(&rel, &path, Entry::Symlink(target), &meta)?;
            } else if meta.is_dir() {
                visit(&rel, &path, Entry::Dir, &meta)?;
                stack.push(rel);
            } else {
                visit(&rel, &path, Entry::File, &meta)?;
            }
        }
    }
    Ok(())
}

/// Tars `context` for the engine.
pub fn tar_context(context: &Path) -> Result<Vec<u8>, ContextError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    walk(context, |rel, path, entry, _| match entry {
        Entry::Dir => builder.append_dir(rel, path),
        Entry::File | Entry::Symlink(_) => builder.append_path_with_name(path, rel),
    })?;
    Ok(builder.into_inner()?)
}

/// A hash of what `tar_context` would send, made of names, kinds, executable bits, link
/// targets and contents (not times or owners): equal for equal contexts, wherever and
/// whenever they were checked out.
pub fn content_hash(context: &Path) -> Result<String, ContextError> {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let mut hasher = sha2::Sha256::new();
    walk(context, |rel, path, entry, meta| {
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        match entry {
            Entry::Dir => hasher.update(b"d"),
            Entry::Symlink(target) => {
                hasher.update(b"l");
                hasher.update(target.as_os_str().as_encoded_bytes());
            }
            Entry::File => {
                let executable = meta.permissions().mode() & 0o111 != 0;
                hasher.update(if executable { b"x" } else { b"f" });
                let mut file = std::fs::File::open(path)?;
                let n = std::io::copy(&mut file, &mut hasher)?;
                hasher.update(n.to_le_bytes());
            }
        }
        hasher.update([0]);
        Ok(())
    })?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `path` resolves inside `root`, following every symlink that exists and treating
/// what does not exist lexically.
fn stays_inside(root: &Path, path: &Path) -> bool {
    if let Ok(real) = path.canonicalize() {
        return real.starts_with(root);
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let ig =
            DockerIgnore::parse("# comment\n*.log\ntarget/\n**/secret*\n!keep.log\ndocs/*.md\n");
        assert!(ig.excludes("a.log"));
        assert!(!ig.excludes("keep.log"));
        assert!(ig.excludes("target/debug/x"));
        assert!(ig.excludes("deep/down/secret.txt"));
        assert!(ig.excludes("docs/a.md"));
        assert!(!ig.excludes("docs/sub/a.md"));
        assert!(!ig.excludes("src/main.rs"));
    }

    #[test]
    fn symlinks_leaving_the_context_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("sub")).unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(ctx.join("sub/a"), "a").unwrap();
        std::os::unix::fs::symlink("sub/a", ctx.join("inside")).unwrap();
        assert!(tar_context(&ctx).is_ok());
        std::os::unix::fs::symlink("../../etc/passwd", ctx.join("sub/out")).unwrap();
        let err = tar_context(&ctx).unwrap_err();
        assert_eq!(
            err.to_string(),
            "symlink `sub/out` points outside the build context"
        );
    }
}
