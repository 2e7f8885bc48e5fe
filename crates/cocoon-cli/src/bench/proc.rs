//! What a process has used, read from /proc: resident memory and CPU time.

/// Resident set size of `pid` in MB, from /proc.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
    Ok(kb / 1024.0)
}

/// CPU seconds `pid` has spent, all its threads, user and system (`utime` + `stime` of
/// /proc/PID/stat; clock ticks, 10 ms each on most kernels).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    cpu_seconds_of(&stat, rustix::param::clock_ticks_per_second())
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))
}

/// `utime` and `stime` are fields 14 and 15; the command name (field 2) may hold spaces and
/// parentheses, so fields are counted from its closing parenthesis.
fn cpu_seconds_of(stat: &str, ticks_per_second: u64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 2263 0 0 0 \
                    150 25 0 0 20 0 9 0 3511 1021673472 11044 18446744073709551615";
        assert_eq!(cpu_seconds_of(stat, 100), Some(1.75));
        assert_eq!(cpu_seconds_of("4242 (x) S 1", 100), None);
    }

    #[test]
    fn this_process_has_spent_some_cpu() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(std::process::id()).unwrap() > 0.0);
        assert!(rss_mb(std::process::id()).unwrap() > 1.0);
    }
}
