//! Mount option strings (`ro`, `nosuid`, `rbind`, `rslave`, `size=64m`, ...) to flags.

use nix::mount::MsFlags;

use super::MountError;

/// Mount options split into what mount(2) takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOptions {
    pub flags: MsFlags,
    pub propagation: MsFlags,
    /// Filesystem-specific options, passed as mount data.
    pub data: Vec<String>,
    pub bind: bool,
    pub recursive: bool,
}

/// Parses a spec's mount options. Unknown words without `=` are an error (a typo would
/// otherwise be passed to the filesystem and fail with a bare EINVAL).
pub fn parse_options(options: &[String], destination: &str) -> Result<ParsedOptions, MountError> {
    let mut out = ParsedOptions {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
        recursive: false,
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" | "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                out.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                out.bind = true;
                out.recursive = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let (kind, recursive) = match opt.as_str() {
                    "private" => (MsFlags::MS_PRIVATE, false),
                    "rprivate" => (MsFlags::MS_PRIVATE, true),
                    "shared" => (MsFlags::MS_SHARED, false),
                    "rshared" => (MsFlags::MS_SHARED, true),
                    "slave" => (MsFlags::MS_SLAVE, false),
                    "rslave" => (MsFlags::MS_SLAVE, true),
                    "unbindable" => (MsFlags::MS_UNBINDABLE, false),
                    _ => (MsFlags::MS_UNBINDABLE, true),
                };
                out.propagation = if recursive {
                    kind | MsFlags::MS_REC
                } else {
                    kind
                };
                continue;
            }
            // devpts' private-instance switch is filesystem data without a value.
            other if other.contains('=') || other == "newinstance" => {
                out.data.push(other.to_string());
                continue;
            }
            other => {
                return Err(MountError::UnknownOption {
                    destination: destination.to_string(),
                    option: other.to_string(),
                });
            }
        };
        out.flags = (out.flags | set) - clear;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(opts: &[&str]) -> Result<ParsedOptions, MountError> {
        let v: Vec<String> = opts.iter().map(|s| (*s).to_string()).collect();
        parse_options(&v, "/x")
    }

    #[test]
    fn flags_propagation_and_data() {
        let p = parse(&[
            "nosuid",
            "noexec",
            "nodev",
            "ro",
            "mode=1777",
            "size=65536k",
        ])
        .unwrap();
        assert_eq!(
            p.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(p.data, vec!["mode=1777", "size=65536k"]);
        assert!(!p.bind);
        assert_eq!(parse(&["ro", "rw"]).unwrap().flags, MsFlags::empty());
        assert_eq!(
            parse(&["private"]).unwrap().propagation,
            MsFlags::MS_PRIVATE
        );
        assert_eq!(
            parse(&["rprivate"]).unwrap().propagation,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC
        );
        assert_eq!(
            parse(&["rshared"]).unwrap().propagation,
            MsFlags::MS_SHARED | MsFlags::MS_REC
        );
        assert_eq!(parse(&["slave"]).unwrap().propagation, MsFlags::MS_SLAVE);
        assert_eq!(
            parse(&["runbindable"]).unwrap().propagation,
            MsFlags::MS_UNBINDABLE | MsFlags::MS_REC
        );
        let b = parse(&["rbind"]).unwrap();
        assert!(b.bind && b.recursive);
    }

    #[test]
    fn unknown_words_are_refused_with_the_destination() {
        let e = parse(&["nosiud"]).unwrap_err();
        assert_eq!(e.to_string(), "mount on /x: unknown option \"nosiud\"");
    }
}
