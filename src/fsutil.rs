//! File-system helpers shared by everything that writes user-visible files.

use crate::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: `NAME.tmp` in the same folder is written and fsynced, then renamed
/// over `path`, then the folder is fsynced. A crash or Ctrl-C at any point leaves either the old file or the
/// new one, never half of one; a failed write removes its temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_via(path, &tmp_path(path), bytes)
}

/// [`write_atomic`] for a file that several processes may write at once (a study's plots, written by every
/// worker): each writes its own `NAME.PID.tmp`, so one's rename never takes away the other's file.
pub fn write_atomic_shared(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    write_atomic_via(path, &path.with_file_name(name), bytes)
}

fn write_atomic_via(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp.to_path_buf();
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    kill_point("before_rename");
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    // Make the rename itself durable. Opening a folder for sync is not possible everywhere (Windows), and the
    // data is already safe under either name, so failure here is not an error.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Fault injection for the crash tests (`tests/robust_runs.rs`): with `GRAFT_KILL_AT=POINT@N` in the
/// environment, the `N`th time (1-based) the process reaches `kill_point("POINT")` it sends itself SIGKILL,
/// as `kill -9` from outside would, at a moment a test can name (a checkpoint half written, the metrics line
/// not yet appended). Without the variable this is one cached lookup.
pub fn kill_point(point: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var("GRAFT_KILL_AT").ok()?;
        let (name, n) = v.split_once('@')?;
        Some((name.to_string(), n.parse().ok()?))
    });
    let Some((name, n)) = target else { return };
    if name == point && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
        // `kill` is not on PATH: stop as abruptly as possible anyway.
        std::process::abort();
    }
}

/// The lower-case hex SHA-256 of `bytes`: the checksum of a checkpoint's or an export's tensor data.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `NAME.tmp` next to `NAME`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Whether `a` and `b` name one file. When both exist, on unix that is the same device and inode (so a hard
/// link counts), elsewhere the same canonical path (symlinks and `..` resolved). A path that does not exist
/// yet is compared by its canonical folder plus its name, so it is never the same as an existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    matches!((canonical(a), canonical(b)), (Some(x), Some(y)) if x == y)
}

/// `path` canonicalised, or for a path that does not exist its canonical folder joined with its name.
fn canonical(path: &Path) -> Option<PathBuf> {
    if let Ok(c) = path.canonicalize() {
        return Some(c);
    }
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(dir.canonicalize().ok()?.join(name))
}

/// Refuses to write `output` when it is one of `inputs` ([`same_file`]): writing a command's result over
/// what it reads (`graft convert X.pth X.pth`, `graft export RUN --out RUN/best.safetensors`) would replace
/// the only copy of the input. The error ([`Error::OutputIsInput`]) names both paths as the user gave them.
pub fn refuse_output_over_input<'a>(
    output: &Path,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<()> {
    for input in inputs {
        if same_file(output, input) {
            return Err(Error::OutputIsInput {
                output: output.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_same_file_is_recognised_through_other_spellings_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        std::fs::write(&a, b"x").unwrap();
        let dotted = dir.path().join(".").join("a.bin");
        assert!(same_file(&a, &dotted));
        let hard = dir.path().join("hard.bin");
        std::fs::hard_link(&a, &hard).unwrap();
        assert!(same_file(&a, &hard), "a hard link is the same file");
        #[cfg(unix)]
        {
            let soft = dir.path().join("soft.bin");
            std::os::unix::fs::symlink(&a, &soft).unwrap();
            assert!(same_file(&soft, &a), "a symlink is the same file");
        }
        let other = dir.path().join("b.bin");
        std::fs::write(&other, b"x").unwrap();
        assert!(
            !same_file(&a, &other),
            "equal contents are not the same file"
        );
        assert!(!same_file(&dir.path().join("new.bin"), &a));
        let err = refuse_output_over_input(&hard, [a.as_path()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("hard.bin") && err.contains("a.bin"), "{err}");
    }

    #[test]
    fn unwritable_folder_is_named() {
        let p = Path::new("/nonexistent-graft-dir/x.safetensors");
        let msg = write_atomic(p, b"x").unwrap_err().to_string();
        assert!(
            msg.contains("/nonexistent-graft-dir/x.safetensors"),
            "{msg}"
        );
    }
}
