//! The runner's side of `outpost invoke`: writing the uploaded files into the workspace and
//! turning the command into a process to start.
//!
//! The command arrives as the words the person's own shell produced, so nothing is expanded
//! here; `kubectl` and `helm` as the first word run the runner's configured binaries, like
//! `kubectl:`/`helm:` steps, and get the same `KUBECONFIG`.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use outpost_protocol::UploadedFile;

/// Writes `files` under `workspace`, creating directories as needed; returns how many bytes
/// were written.
///
/// The server has checked the paths already; they are checked again here because a runner
/// trusts nothing that would let a job write outside its workspace.
pub fn write_files(workspace: &Path, files: &[UploadedFile]) -> Result<u64, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut total = 0u64;
    for file in files {
        let relative = Path::new(&file.path);
        let inside = !file.path.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(format!(
                "the uploaded file {:?} would land outside the workspace; not running the command",
                file.path
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&file.content_base64)
            .map_err(|e| format!("the uploaded file {:?} is not valid base64: {e}", file.path))?;
        let path = workspace.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("could not create {}: {e}", parent.display()))?;
        }
        let mode = if file.executable { 0o755 } else { 0o644 };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("could not create {}: {e}", path.display()))?;
        out.write_all(&bytes)
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
        total += bytes.len() as u64;
    }
    Ok(total)
}

/// The program to start for the command's first word.
///
/// `kubectl` and `helm` are the runner's configured binaries; a relative path with a slash
/// (`./deploy.sh`, `bin/tool`) is taken from the workspace; any other word is looked up on `PATH`.
pub fn program(first: &str, workspace: &Path, kubectl: &Path, helm: &Path) -> PathBuf {
    match first {
        "kubectl" => kubectl.to_path_buf(),
        "helm" => helm.to_path_buf(),
        p if p.contains('/') && !p.starts_with('/') => workspace.join(p),
        p => PathBuf::from(p),
    }
}

/// The script text for `--shell`: the words joined by spaces, like `ssh host a b` does.
pub fn script(argv: &[String]) -> String {
    let mut text = argv.join(" ");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8], executable: bool) -> UploadedFile {
        UploadedFile {
            path: path.into(),
            content_base64: base64::engine::general_purpose::STANDARD.encode(content),
            executable,
        }
    }

    #[test]
    fn files_land_in_the_workspace_with_their_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let n = write_files(
            dir.path(),
            &[
                file("m.yaml", b"kind: Pod\n", false),
                file("bin/run.sh", b"#!/bin/sh\necho hi\n", true),
            ],
        )
        .unwrap();
        assert_eq!(n, 10 + 18);
        assert_eq!(
            std::fs::read(dir.path().join("m.yaml")).unwrap(),
            b"kind: Pod\n"
        );
        let mode = std::fs::metadata(dir.path().join("bin/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn paths_outside_the_workspace_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "/tmp/x", "a/../../x", ""] {
            assert!(
                write_files(dir.path(), &[file(bad, b"x", false)]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn kubectl_and_helm_are_the_configured_binaries() {
        let ws = Path::new("/w");
        let (k, h) = (Path::new("/opt/kubectl"), Path::new("/opt/helm"));
        assert_eq!(program("kubectl", ws, k, h), PathBuf::from("/opt/kubectl"));
        assert_eq!(program("helm", ws, k, h), PathBuf::from("/opt/helm"));
        assert_eq!(program("./x.sh", ws, k, h), PathBuf::from("/w/./x.sh"));
        assert_eq!(program("cat", ws, k, h), PathBuf::from("cat"));
        assert_eq!(program("/bin/cat", ws, k, h), PathBuf::from("/bin/cat"));
    }
}
