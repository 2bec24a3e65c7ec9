//! Small files shared between processes (the agent, the monitors, the VMMs): written
//! whole or not at all, read as JSON.

use std::path::Path;

use crate::Error;

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read(path).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

/// Writes a file so that readers see the old or the new content, never half: a
/// temporary file renamed over the old one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| Error::io(tmp.display(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomic(&path, b"[1]").unwrap();
        write_atomic(&path, b"[1, 2]").unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), vec![1, 2]);
        assert!(!path.with_extension("tmp").exists(), "no temporary file is left");
        let e = read_json::<Vec<u32>>(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
    }
}
