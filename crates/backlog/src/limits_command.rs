//! `backlog limits`: sets the limits that `--limiter` processes share in
//! Redis, then shows them with the leases held now.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use deferred_semaphore_redis::{Holder, LimitChange, Limits};
use serde_json::{json, Value};

use crate::cli::LimitsArgs;
use crate::duration::format_duration;
use crate::fleet::{self, parse_limiter_url, LimiterUrl};

/// Applies the changes that `args` gives, then prints the limits and the
/// holders.
///
/// # Errors
///
/// Fails on an invalid URL, and when Redis cannot be reached or rejects a
/// change.
pub fn run(args: &LimitsArgs) -> anyhow::Result<()> {
    let url = parse_limiter_url(&args.url, |name| std::env::var(name).ok())
        .map_err(|reason| anyhow::anyhow!("invalid limiter URL {reason}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (limits, mut holders, grace) = runtime
        .block_on(apply_and_read(&url, args))
        .map_err(anyhow::Error::msg)?;
    sort_holders(&mut holders);
    let text = if args.json {
        let mut line = render_json(&url, &limits, &holders, grace).to_string();
        line.push('\n');
        line
    } else {
        render_text(&url, &limits, &holders, grace)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("cannot write to standard output")
}

/// Returns the changes of `args` in the order they are applied. The lease
/// comes first because the first change to a new namespace starts a grace
/// of one lease, in which nothing is granted.
fn changes(args: &LimitsArgs) -> Vec<LimitChange> {
    let mut changes = Vec::new();
    if let Some(lease) = args.lease {
        changes.push(LimitChange::Lease(lease));
    }
    if let Some(global) = args.global {
        changes.push(LimitChange::Global(global));
    }
    if let Some(default) = args.per_key_default {
        changes.push(LimitChange::PerKeyDefault(default.0));
    }
    for (key, limit) in &args.keys {
        changes.push(LimitChange::Key(key.clone(), Some(*limit)));
    }
    for key in &args.remove_keys {
        changes.push(LimitChange::Key(key.clone(), None));
    }
    changes
}

async fn apply_and_read(
    url: &LimiterUrl,
    args: &LimitsArgs,
) -> Result<(Limits, Vec<Holder>, Option<Duration>), String> {
    let connected = fleet::connect(url, args.limiter_timeout).await?;
    let limiter = connected.limiter();
    let failed = |error| fleet::describe_error(url, &error);
    for change in changes(args) {
        limiter.set_limit(change).await.map_err(failed)?;
    }
    let limits = limiter.limits().await.map_err(failed)?;
    let holders = limiter.holders().await.map_err(failed)?;
    let grace = limiter.grace_left().await.map_err(failed)?;
    Ok((limits, holders, grace))
}

/// Sorts holders by key, the global-only leases first, then from the
/// youngest lease to the oldest.
fn sort_holders(holders: &mut [Holder]) {
    holders.sort_by(|a, b| (&a.key, a.age).cmp(&(&b.key, b.age)));
}

fn render_text(
    url: &LimiterUrl,
    limits: &Limits,
    holders: &[Holder],
    grace: Option<Duration>,
) -> String {
    let limit = |value: Option<u64>| value.map_or_else(|| "none".to_owned(), |n| n.to_string());
    let mut rows = vec![
        ("global".to_owned(), limit(limits.global)),
        ("per-key default".to_owned(), limit(limits.per_key_default)),
        ("lease".to_owned(), format_duration(limits.lease)),
    ];
    for (key, n) in &limits.per_key {
        rows.push((format!("key {key}"), n.to_string()));
    }
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);

    let mut text = format!("Limits of {url}:\n");
    for (name, value) in rows {
        let _ = writeln!(text, "  {name:<width$}  {value}");
    }
    if let Some(grace) = grace {
        let _ = writeln!(
            text,
            "Grants start in {}: a new name, or one whose data Redis lost, waits one lease time.",
            format_duration(grace)
        );
    }
    if holders.is_empty() {
        text.push_str("Holders: none\n");
        return text;
    }

    let leases = if holders.len() == 1 {
        "lease"
    } else {
        "leases"
    };
    let _ = writeln!(text, "Holders: {} {leases}", holders.len());
    let mut table = vec![[
        "KEY".to_owned(),
        "HOLDER".to_owned(),
        "FENCE".to_owned(),
        "AGE".to_owned(),
        "EXPIRES IN".to_owned(),
    ]];
    for holder in holders {
        table.push([
            holder.key.clone().unwrap_or_else(|| "-".to_owned()),
            holder.holder.clone(),
            holder.fence.to_string(),
            format_duration(holder.age),
            format_duration(holder.expires_in),
        ]);
    }

    let widths: Vec<usize> = (0..5)
        .map(|column| table.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    text
}

fn render_json(
    url: &LimiterUrl,
    limits: &Limits,
    holders: &[Holder],
    grace: Option<Duration>,
) -> Value {
    let per_key: serde_json::Map<String, Value> = limits
        .per_key
        .iter()
        .map(|(key, n)| (key.clone(), json!(n)))
        .collect();
    let holders: Vec<Value> = holders
        .iter()
        .map(|holder| {
            json!({
                "key": holder.key,
                "holder": holder.holder,
                "lease_id": holder.lease_id,
                "fence": holder.fence,
                "age_ms": millis(holder.age),
                "expires_in_ms": millis(holder.expires_in),
            })
        })
        .collect();
    json!({
        "url": url.to_string(),
        "global": limits.global,
        "per_key_default": limits.per_key_default,
        "per_key": per_key,
        "lease_ms": millis(limits.lease),
        "grace_left_ms": grace.map(millis),
        "holders": holders,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn holder(key: Option<&str>, age_ms: u64, fence: u64) -> Holder {
        Holder {
            key: key.map(str::to_owned),
            lease_id: format!("lease-{fence}"),
            holder: "host:1".to_owned(),
            fence,
            age: Duration::from_millis(age_ms),
            expires_in: Duration::from_millis(30_000 - age_ms),
        }
    }

    fn limits() -> Limits {
        Limits {
            global: Some(4),
            per_key_default: None,
            per_key: vec![("a.example".to_owned(), 2)],
            lease: Duration::from_secs(30),
        }
    }

    #[test]
    fn holders_sort_by_key_then_age() {
        let mut holders = vec![
            holder(Some("b"), 100, 1),
            holder(Some("a"), 900, 2),
            holder(None, 50, 3),
            holder(Some("a"), 300, 4),
        ];
        sort_holders(&mut holders);
        let fences: Vec<u64> = holders.iter().map(|h| h.fence).collect();
        assert_eq!(fences, [3, 4, 2, 1]);
    }

    #[test]
    fn text_lists_limits_and_holders() {
        let url = parse_limiter_url("redis://127.0.0.1:7000/jobs", |_| None).unwrap();
        let holders = [holder(None, 1500, 12), holder(Some("a.example"), 250, 13)];
        let text = render_text(&url, &limits(), &holders, None);
        let expected = "\
Limits of redis://127.0.0.1:7000/jobs:
  global           4
  per-key default  none
  lease            30s
  key a.example    2
Holders: 2 leases
KEY        HOLDER  FENCE  AGE    EXPIRES IN
-          host:1  12     1.5s   28.5s
a.example  host:1  13     250ms  29.75s
";
        assert_eq!(text, expected);
        let empty = render_text(&url, &limits(), &[], Some(Duration::from_millis(4500)));
        assert!(empty.ends_with("Holders: none\n"), "{empty}");
        assert!(
            empty.contains("\nGrants start in 4.5s: a new name"),
            "{empty}"
        );
    }

    #[test]
    fn json_has_limits_and_holders() {
        let url = parse_limiter_url("redis://127.0.0.1:7000/jobs", |_| None).unwrap();
        let value = render_json(
            &url,
            &limits(),
            &[holder(Some("a.example"), 250, 13)],
            Some(Duration::from_secs(2)),
        );
        assert_eq!(value["grace_left_ms"], 2000);
        assert_eq!(value["url"], "redis://127.0.0.1:7000/jobs");
        assert_eq!(value["global"], 4);
        assert_eq!(value["per_key_default"], Value::Null);
        assert_eq!(value["per_key"]["a.example"], 2);
        assert_eq!(value["lease_ms"], 30_000);
        assert_eq!(value["holders"][0]["key"], "a.example");
        assert_eq!(value["holders"][0]["fence"], 13);
        assert_eq!(value["holders"][0]["age_ms"], 250);
        assert_eq!(value["holders"][0]["expires_in_ms"], 29_750);
    }
}
