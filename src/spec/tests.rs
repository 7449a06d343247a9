use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

const HELLO: &str = "apiVersion: berth/v1\nkind: App\nname: hello\nimage: busybox:1\ndomains: [Hello.Example.COM.]\n";

#[test]
fn valid_spec_gets_defaults_and_lowercase_domains() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.yaml", HELLO);
    let loaded = load_paths(&[f]);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let spec = &loaded.apps[0].spec;
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.domains, vec!["hello.example.com"]);
    assert_eq!(spec.deploy.max_surge, 1);
}

#[test]
fn hash_ignores_formatting_and_spelled_out_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a/a.yaml", HELLO);
    let b = write(
        dir.path(),
        "b/b.yaml",
        "# same app, written differently\nname: hello\nkind: App\nreplicas: 1\napiVersion: \"berth/v1\"\ndomains:\n  - hello.example.com\nimage: 'busybox:1'\ndeploy: {strategy: rolling, drain_timeout: 30s}\n",
    );
    let la = load_paths(&[a]);
    let lb = load_paths(&[b]);
    assert_eq!(la.apps[0].spec.spec_hash(), lb.apps[0].spec.spec_hash());
}

#[test]
fn unknown_field_suggests_and_points_at_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.yaml",
        "apiVersion: berth/v1\nkind: App\nname: hello\nimage: x\nreplica: 2\n",
    );
    let loaded = load_paths(&[f]);
    let e = &loaded.errors[0];
    assert_eq!((e.pos.line, e.pos.col), (5, 1));
    assert_eq!(e.field, "replica");
    assert!(e.message.contains("did you mean `replicas`"), "{e}");
    assert_eq!(loaded.invalid_names[0].0, "hello");
}

#[test]
fn nested_type_error_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.yaml",
        "apiVersion: berth/v1\nkind: App\nname: hello\nimage: x\ndeploy:\n  max_surge: lots\n",
    );
    let e = &load_paths(&[f]).errors[0];
    assert_eq!(e.field, "deploy.max_surge");
    assert_eq!((e.pos.line, e.pos.col), (6, 14));
}

#[test]
fn context_may_not_escape_root_even_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = dir.path().join("specs");
    write(&root, "app/Dockerfile", "FROM scratch\n");
    std::os::unix::fs::symlink(outside.path(), root.join("sneaky")).unwrap();
    let spec =
        |ctx: &str| format!("apiVersion: berth/v1\nkind: App\nname: a\nbuild:\n  context: {ctx}\n");
    write(&root, "ok.yaml", &spec("app"));
    let loaded = load_paths(std::slice::from_ref(&root));
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    for bad in ["..", "app/../..", "sneaky"] {
        write(&root, "ok.yaml", &spec(bad));
        let loaded = load_paths(std::slice::from_ref(&root));
        let e = &loaded.errors[0];
        assert_eq!(e.field, "build.context", "{bad}: {e}");
        assert!(e.message.contains("leaves the source root"), "{bad}: {e}");
    }
}

#[test]
fn duplicates_across_files_name_the_first() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", HELLO);
    write(dir.path(), "b.yaml", HELLO);
    write(
        dir.path(),
        "c.yaml",
        &HELLO.replace("name: hello", "name: other"),
    );
    let loaded = load_paths(&[dir.path().to_path_buf()]);
    assert_eq!(loaded.apps.len(), 1);
    assert_eq!(loaded.errors.len(), 2, "{:?}", loaded.errors);
    assert!(loaded.errors[0].message.contains("already defined at"));
    assert!(
        loaded.errors[1]
            .message
            .contains("already used by app `hello`")
    );
}

#[test]
fn exactly_one_source() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.yaml",
        "apiVersion: berth/v1\nkind: App\nname: a\n",
    );
    assert!(
        load_paths(&[f]).errors[0]
            .message
            .contains("exactly one of")
    );
    let f = write(
        dir.path(),
        "b.yaml",
        "apiVersion: berth/v1\nkind: App\nname: b\nruntime: exec\ncommand: [/bin/true]\n",
    );
    assert!(load_paths(&[f]).errors.is_empty());
}

#[test]
fn ignored_names() {
    for n in [
        ".hidden.yaml",
        "a.yaml~",
        ".a.yaml.swp",
        "#a.yaml#",
        "a.yaml.tmp",
    ] {
        assert!(is_ignored_name(n), "{n}");
    }
    assert!(!is_ignored_name("a.yaml"));
}
