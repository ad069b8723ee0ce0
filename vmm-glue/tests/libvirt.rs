//! The libvirt domain in docs/deploy.md is valid for libvirt's schema (`virt-xml-validate`,
//! from Debian's libvirt-clients, which scripts/prereqs.sh installs). No libvirt daemon runs
//! here, so this is as far as the recipe is checked.

use std::process::Command;

#[test]
fn the_documented_domain_passes_libvirts_schema() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/deploy.md")).unwrap();
    let section = &doc[doc.find("## libvirt").expect("a libvirt section")..];
    let start = section
        .find("```xml\n")
        .expect("an xml block in the libvirt section")
        + "```xml\n".len();
    let xml = &section[start..start + section[start..].find("```").unwrap()];
    assert!(
        xml.contains("<disk type='vhostuser'"),
        "the example has no vhost-user disk:\n{xml}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect(
            "virt-xml-validate (Debian package libvirt-clients; scripts/prereqs.sh installs it)",
        );
    assert!(
        out.status.success(),
        "docs/deploy.md's domain does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
