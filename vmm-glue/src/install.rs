//! `vmm-glue install`: puts vublk's vhost-user descriptor where QEMU tooling looks for it.
//!
//! The descriptor goes to `PREFIX/share/qemu/vhost-user/50-vublk.json` (under `DESTDIR` when
//! staging a package) with the binary path `PREFIX/bin/vublk` unless told otherwise. When the
//! binary is already there it must answer `--print-capabilities` as the block backend the
//! descriptor announces ([`descriptor::check`]), so a descriptor never points at something else.
//!
//! QEMU's spec lists the directories management software searches: `/usr/share/qemu/vhost-user`
//! (distribution packages), `/etc/qemu/vhost-user` (the administrator) and
//! `$XDG_CONFIG_HOME/qemu/vhost-user` (a user). Another prefix, `/usr/local` included, is not
//! among them: [`Installed::searched`] says so, so the caller can warn.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::descriptor::{self, Capabilities, DescriptorError};

/// Where, below a prefix, the descriptor goes.
pub const DESCRIPTOR_DIR: &str = "share/qemu/vhost-user";
/// The directories QEMU's spec tells management software to search (besides the per-user one).
pub const SEARCHED_DIRS: [&str; 2] = ["/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user"];

/// What to install where.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The installation prefix (`/usr`, `/usr/local`, ...); absolute.
    pub prefix: PathBuf,
    /// Stage under this directory (packaging's `DESTDIR`); paths inside the descriptor stay
    /// relative to `/`.
    pub destdir: Option<PathBuf>,
    /// The vublk binary as installed; default `PREFIX/bin/vublk`.
    pub binary: Option<PathBuf>,
}

/// What [`install`] did.
#[derive(Clone, Debug)]
pub struct Installed {
    /// The file written (under `DESTDIR` if given).
    pub path: PathBuf,
    /// The binary the descriptor names.
    pub binary: PathBuf,
    /// The binary's capabilities, or `None` if it is not installed yet.
    pub capabilities: Option<Capabilities>,
    /// Whether QEMU tooling searches the directory written to.
    pub searched: bool,
}

/// Install failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("--prefix must be an absolute path, not {0:?}")]
    RelativePrefix(PathBuf),
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    #[error("could not write {0:?}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Writes the descriptor; see the module docs.
pub fn install(opts: &InstallOptions) -> Result<Installed, InstallError> {
    if !opts.prefix.is_absolute() {
        return Err(InstallError::RelativePrefix(opts.prefix.clone()));
    }
    let binary = opts
        .binary
        .clone()
        .unwrap_or_else(|| opts.prefix.join("bin/vublk"));
    let text = descriptor::render(&binary)?;

    let staged = |p: &Path| match &opts.destdir {
        Some(d) => d.join(relative(p)),
        None => p.to_path_buf(),
    };
    let staged_binary = staged(&binary);
    let capabilities = if staged_binary.exists() {
        Some(descriptor::check(&staged_binary)?)
    } else {
        None
    };

    let dir = opts.prefix.join(DESCRIPTOR_DIR);
    let path = staged(&dir).join(descriptor::FILE_NAME);
    write_atomically(&path, text.as_bytes()).map_err(|e| InstallError::Write(path.clone(), e))?;
    Ok(Installed {
        path,
        binary,
        capabilities,
        searched: SEARCHED_DIRS.iter().any(|d| Path::new(d) == dir),
    })
}

/// `p` without its root, for joining under `DESTDIR`.
fn relative(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
        .collect()
}

/// Writes `path` through a temporary file in the same directory and a rename, so a reader never
/// sees half a descriptor; mode 0644.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".vublk-")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_under_prefix_with_the_binary_filled_in() {
        let root = tempfile::tempdir().unwrap();
        let prefix = root.path().join("usr");
        let got = install(&InstallOptions {
            prefix: prefix.clone(),
            destdir: None,
            binary: None,
        })
        .unwrap();
        assert_eq!(got.path, prefix.join("share/qemu/vhost-user/50-vublk.json"));
        assert_eq!(got.binary, prefix.join("bin/vublk"));
        assert!(got.capabilities.is_none(), "no binary was installed");
        assert!(!got.searched);
        let d: descriptor::Descriptor =
            serde_json::from_str(&fs::read_to_string(&got.path).unwrap()).unwrap();
        assert_eq!(d.binary, prefix.join("bin/vublk"));
        let mode = fs::metadata(&got.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn destdir_stages_without_changing_the_paths_inside() {
        let dest = tempfile::tempdir().unwrap();
        let got = install(&InstallOptions {
            prefix: "/usr".into(),
            destdir: Some(dest.path().to_path_buf()),
            binary: Some("/usr/libexec/vublk".into()),
        })
        .unwrap();
        assert_eq!(
            got.path,
            dest.path().join("usr/share/qemu/vhost-user/50-vublk.json")
        );
        assert!(got.searched, "/usr/share/qemu/vhost-user is searched");
        let d: descriptor::Descriptor =
            serde_json::from_str(&fs::read_to_string(&got.path).unwrap()).unwrap();
        assert_eq!(d.binary, Path::new("/usr/libexec/vublk"));
    }

    #[test]
    fn refuses_a_relative_prefix_and_a_binary_that_is_not_vublk() {
        assert!(matches!(
            install(&InstallOptions {
                prefix: "usr".into(),
                destdir: None,
                binary: None,
            }),
            Err(InstallError::RelativePrefix(_))
        ));
        // /bin/true exits 0 and prints nothing: not capabilities JSON.
        let root = tempfile::tempdir().unwrap();
        let err = install(&InstallOptions {
            prefix: root.path().to_path_buf(),
            destdir: None,
            binary: Some("/bin/true".into()),
        })
        .unwrap_err();
        assert!(
            matches!(err, InstallError::Descriptor(DescriptorError::NotJson(..))),
            "{err}"
        );
        assert!(!root.path().join("share").exists(), "nothing was written");
    }
}
