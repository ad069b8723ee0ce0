//! vublk's QEMU vhost-user backend descriptor, and the capabilities it stands for.
//!
//! QEMU's `docs/interop/vhost-user.json` defines how management software finds vhost-user
//! backends: a JSON file per backend (`VhostUserBackend`: `description`, `type`, `binary`,
//! optional `tags`) in `/usr/share/qemu/vhost-user/`, `/etc/qemu/vhost-user/` or
//! `$XDG_CONFIG_HOME/qemu/vhost-user/`, and what the backend supports from running
//! `binary --print-capabilities` (`VHostUserBackendCapabilities`: for `block`, the features
//! `read-only` and `blk-file`, meaning the command line options of those names). The descriptor
//! itself carries no features; [`capabilities`] reads them from the binary and [`check`] makes
//! sure the two agree.
//!
//! The descriptor ships as `vmm-glue/share/50-vublk.json` with `/usr/bin/vublk` as the binary;
//! [`render`] fills in where vublk is actually installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The descriptor as shipped.
pub const TEMPLATE: &str = include_str!("../share/50-vublk.json");
/// Its file name: the `50-` prefix orders it among other backends' files, as the spec suggests.
pub const FILE_NAME: &str = "50-vublk.json";
/// The backend type vublk is.
pub const TYPE: &str = "block";
/// Every feature QEMU's schema defines for `block` backends (`VHostUserBackendBlockFeature`).
pub const BLOCK_FEATURES: [&str; 2] = ["read-only", "blk-file"];

/// `VhostUserBackend`: the descriptor file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub description: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Absolute path of the backend binary.
    pub binary: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// `VHostUserBackendCapabilities`: what `binary --print-capabilities` prints.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Capabilities {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub features: Vec<String>,
}

/// Descriptor failures.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("the shipped descriptor is not valid")]
    Template(#[source] serde_json::Error),
    #[error("the backend binary must be an absolute path, not {0:?}")]
    RelativeBinary(PathBuf),
    #[error("could not run {0:?} --print-capabilities")]
    Run(PathBuf, #[source] std::io::Error),
    #[error("{binary:?} --print-capabilities failed ({status}): {stderr}")]
    Failed {
        binary: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{0:?} --print-capabilities did not print capabilities JSON")]
    NotJson(PathBuf, #[source] serde_json::Error),
    #[error("{binary:?} is a vhost-user '{found}' backend, the descriptor says '{TYPE}'")]
    WrongType { binary: PathBuf, found: String },
    #[error("{binary:?} reports block feature '{feature}', which QEMU's schema does not define")]
    UnknownFeature { binary: PathBuf, feature: String },
}

/// The shipped descriptor.
pub fn template() -> Result<Descriptor, DescriptorError> {
    serde_json::from_str(TEMPLATE).map_err(DescriptorError::Template)
}

/// The descriptor for vublk installed at `binary`, as file contents.
pub fn render(binary: &Path) -> Result<String, DescriptorError> {
    if !binary.is_absolute() {
        return Err(DescriptorError::RelativeBinary(binary.to_path_buf()));
    }
    let mut d = template()?;
    d.binary = binary.to_path_buf();
    let mut text = serde_json::to_string_pretty(&d).map_err(DescriptorError::Template)?;
    text.push('\n');
    Ok(text)
}

/// Runs `binary --print-capabilities`.
pub fn capabilities(binary: &Path) -> Result<Capabilities, DescriptorError> {
    let out = Command::new(binary)
        .arg("--print-capabilities")
        .output()
        .map_err(|e| DescriptorError::Run(binary.to_path_buf(), e))?;
    if !out.status.success() {
        return Err(DescriptorError::Failed {
            binary: binary.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| DescriptorError::NotJson(binary.to_path_buf(), e))
}

/// Checks that `binary` is the block backend the descriptor announces, with only features QEMU
/// knows; returns its capabilities.
pub fn check(binary: &Path) -> Result<Capabilities, DescriptorError> {
    let caps = capabilities(binary)?;
    if caps.kind != TYPE {
        return Err(DescriptorError::WrongType {
            binary: binary.to_path_buf(),
            found: caps.kind,
        });
    }
    if let Some(f) = caps
        .features
        .iter()
        .find(|f| !BLOCK_FEATURES.contains(&f.as_str()))
    {
        return Err(DescriptorError::UnknownFeature {
            binary: binary.to_path_buf(),
            feature: f.clone(),
        });
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_descriptor_follows_the_schema() {
        let d = template().unwrap();
        assert_eq!(d.kind, "block");
        assert_eq!(d.binary, Path::new("/usr/bin/vublk"));
        assert!(!d.description.is_empty());
    }

    #[test]
    fn render_fills_in_the_binary_and_keeps_the_rest() {
        let text = render(Path::new("/opt/vublk/bin/vublk")).unwrap();
        let d: Descriptor = serde_json::from_str(&text).unwrap();
        assert_eq!(d.binary, Path::new("/opt/vublk/bin/vublk"));
        assert_eq!(d.kind, "block");
        assert_eq!(d.description, template().unwrap().description);
        // Key order as in the schema's example, no `tags` when there are none.
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(keys, ["description", "type", "binary"]);
        assert!(matches!(
            render(Path::new("bin/vublk")),
            Err(DescriptorError::RelativeBinary(_))
        ));
    }
}
