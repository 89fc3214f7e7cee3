//! Scores: among the nodes that fit, which is best? Each score is 0..=100, higher is better.

use super::resources::Resources;
use super::state::NodeInfo;

/// Requests counted for scoring when a container asks for nothing, so empty pods still spread
/// by count (100m cpu, 200Mi memory, in thousandths).
const DEFAULT_CPU: i128 = 100;
const DEFAULT_MEMORY: i128 = 200 * 1024 * 1024 * 1000;

/// The pod's cpu and memory for scoring, with the defaults above for zero requests.
pub fn scoring_requests(requests: &Resources) -> (i128, i128) {
    let cpu = requests.get("cpu");
    let mem = requests.get("memory");
    (
        if cpu == 0 { DEFAULT_CPU } else { cpu },
        if mem == 0 { DEFAULT_MEMORY } else { mem },
    )
}

fn free_fraction(alloc: i128, used: i128) -> i128 {
    if alloc <= 0 || used >= alloc {
        0
    } else {
        (alloc - used) * 100 / alloc
    }
}

/// Prefers the node with the most room left after placing the pod, cpu and memory equally.
/// Counts placed pods with the scoring defaults so pods that request nothing still spread.
pub fn least_allocated(pod: (i128, i128), info: &NodeInfo) -> i64 {
    let (used_cpu, used_mem) = info.non_zero_requested;
    let cpu = free_fraction(info.allocatable.get("cpu"), used_cpu + pod.0);
    let mem = free_fraction(info.allocatable.get("memory"), used_mem + pod.1);
    ((cpu + mem) / 2) as i64
}

/// Prefers nodes with fewer pods of the same controller; `max` is the most any candidate has.
pub fn spread(owner: Option<&str>, info: &NodeInfo, max: usize) -> i64 {
    let Some(owner) = owner else {
        return 0;
    };
    if max == 0 {
        return 100;
    }
    let here = info.owners.get(owner).copied().unwrap_or(0);
    ((max - here.min(max)) * 100 / max) as i64
}
