//! The private containerd starts, answers, and leaves nothing behind when dropped.

use ferrolet_tests::containerd::Containerd;
use ferrolet_tests::mounts::mounts_below;

#[test]
fn private_containerd_starts_answers_and_cleans_up() {
    let c = Containerd::start().expect("containerd starts");
    let version = c.ctr_ok(&["version"]).expect("ctr version");
    assert!(
        version.contains("Server:"),
        "ctr version printed: {version}"
    );
    let root = c.root.clone();
    drop(c);
    assert!(!root.exists(), "{} still exists after drop", root.display());
    assert!(
        mounts_below(&root).is_empty(),
        "mounts left below {}",
        root.display()
    );
}
