//! What every benchmark of ferrolet reports: figures, each beside its peer measured in the same
//! run, and the ratio. The `ferrolet-bench` program runs them all and merges their figures into
//! one report (`bench/out/report.md` and `report.json`).

use std::path::Path;

pub mod procfs;

use serde::{Deserialize, Serialize};

/// Which direction of a figure is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Times, bytes: the smaller, the better.
    Lower,
    /// Throughputs: the larger, the better.
    Higher,
}

/// One measured figure of ferrolet, with its peer's in the same run when it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// What was measured, e.g. "pod start p50".
    pub name: String,
    /// Unit of `ferrolet` and `peer`, e.g. "ms", "pods/s", "MiB".
    pub unit: String,
    pub ferrolet: f64,
    /// The peer's figure, when the benchmark has a peer for it.
    pub peer: Option<f64>,
    /// Who the peer is, e.g. "containerd 1.6 + runc".
    pub peer_name: Option<String>,
    pub better: Better,
    /// The target, in words, e.g. ">= 7x faster" or "< 100 ms".
    pub target: Option<String>,
    /// Whether the target is met, when there is one.
    pub met: Option<bool>,
}

impl Figure {
    /// A figure compared with a peer.
    #[must_use]
    pub fn versus(
        name: &str,
        unit: &str,
        ferrolet: f64,
        peer: f64,
        peer_name: &str,
        better: Better,
    ) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            ferrolet,
            peer: Some(peer),
            peer_name: Some(peer_name.to_owned()),
            better,
            target: None,
            met: None,
        }
    }

    /// A figure with no peer (an absolute target instead).
    #[must_use]
    pub fn alone(name: &str, unit: &str, ferrolet: f64, better: Better) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            ferrolet,
            peer: None,
            peer_name: None,
            better,
            target: None,
            met: None,
        }
    }

    /// Records the target and whether it was met.
    #[must_use]
    pub fn target(mut self, words: &str, met: bool) -> Self {
        self.target = Some(words.to_owned());
        self.met = Some(met);
        self
    }

    /// How many times better ferrolet is than its peer (above 1 means better).
    #[must_use]
    pub fn ratio(&self) -> Option<f64> {
        let peer = self.peer?;
        let (num, den) = match self.better {
            Better::Lower => (peer, self.ferrolet),
            Better::Higher => (self.ferrolet, peer),
        };
        (den > 0.0).then(|| num / den)
    }
}

/// The figures file a benchmark writes beside its own JSON: `<stem>.figures.json`.
#[must_use]
pub fn figures_path(out: &Path) -> std::path::PathBuf {
    let stem = out
        .file_stem()
        .map_or_else(|| "bench".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}.figures.json"))
}

/// Writes `figures` next to a benchmark's JSON report `out`.
///
/// # Errors
/// When the file can't be written.
pub fn write_figures(out: &Path, figures: &[Figure]) -> std::io::Result<()> {
    let path = figures_path(out);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(figures).map_err(std::io::Error::other)?;
    std::fs::write(path, json)
}

/// Formats a number for the report: few significant digits, no trailing noise.
#[must_use]
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The Markdown table of a report.
#[must_use]
pub fn markdown(sections: &[(String, Vec<Figure>)]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "| benchmark | figure | ferrolet | peer | peer is | ratio | target |\n\
         |---|---|---:|---:|---|---:|---|\n",
    );
    for (bench, figures) in sections {
        for f in figures {
            let peer = f.peer.map_or_else(
                || "-".to_owned(),
                |p| format!("{} {}", format_value(p), f.unit),
            );
            let ratio = f
                .ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}x"));
            let target = match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("{t}: met"),
                (Some(t), Some(false)) => format!("{t}: **missed**"),
                (Some(t), None) => t.clone(),
                (None, _) => String::new(),
            };
            let _ = writeln!(
                md,
                "| {bench} | {} | {} {} | {peer} | {} | {ratio} | {target} |",
                f.name,
                format_value(f.ferrolet),
                f.unit,
                f.peer_name.as_deref().unwrap_or("-"),
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_follow_the_good_direction() {
        let t = Figure::versus("start", "ms", 10.0, 70.0, "containerd", Better::Lower);
        assert_eq!(t.ratio(), Some(7.0));
        let r = Figure::versus("creates", "/s", 4000.0, 1000.0, "etcd", Better::Higher);
        assert_eq!(r.ratio(), Some(4.0));
        assert_eq!(
            Figure::alone("rss", "MiB", 20.0, Better::Lower).ratio(),
            None
        );
        let zero = Figure::versus("x", "ms", 0.0, 5.0, "p", Better::Lower);
        assert_eq!(zero.ratio(), None, "a zero figure has no meaningful ratio");
    }

    #[test]
    fn figures_sit_next_to_the_report() {
        assert_eq!(
            figures_path(Path::new("bench/out/cni.json")),
            Path::new("bench/out/cni.figures.json")
        );
    }

    #[test]
    fn the_table_names_missed_targets() {
        let f =
            Figure::alone("list 10k pods", "ms", 120.0, Better::Lower).target("< 100 ms", false);
        let md = markdown(&[("api".to_owned(), vec![f])]);
        assert!(
            md.contains("| api | list 10k pods | 120 ms | - | - | - | < 100 ms: **missed** |"),
            "{md}"
        );
    }
}
