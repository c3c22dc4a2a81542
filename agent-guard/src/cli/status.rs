use std::process::ExitCode;

use super::SocketArg;
use crate::control::{Request, client};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  agent-guard status\n  agent-guard status --json | jq .agents")]
pub struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Print the full status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let s = client::call(&args.socket.socket, &Request::Status)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &s["daemon"];
    println!(
        "daemon:      running, pid {}, version {}, up {}s",
        d["pid"],
        str_of(&d["version"]),
        d["uptime_seconds"]
    );
    println!("socket:      {}", str_of(&d["socket"]));
    println!("metrics:     http://{}/metrics", str_of(&d["metrics_addr"]));
    println!("cgroups:     {}", str_of(&d["cgroup_root"]));
    let programs: Vec<&str> = s["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    println!(
        "programs:    {} attached ({})",
        programs.len(),
        programs.join(", ")
    );
    let p = &s["policy"];
    println!(
        "policy:      generation {} from {} (sha256 {:.12})",
        p["generation"],
        str_of(&p["origin"]),
        str_of(&p["sha256"])
    );
    println!("tracked:     {} processes", s["tracked_processes"]);
    let lost: u64 = s["events_lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    println!("events lost: {lost}");
    let dec = &s["decisions"];
    println!(
        "decisions:   {} allow, {} deny, {} would_deny",
        dec["allow"], dec["deny"], dec["would_deny"]
    );
    let suspended: Vec<&str> = s["suspended"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    if !suspended.is_empty() {
        println!("suspended:   {}", suspended.join(", "));
    }
    let grants = s["grants"].as_array().cloned().unwrap_or_default();
    println!("grants:      {} active", grants.len());
    for g in &grants {
        println!(
            "  #{:<5} {}/{} tool={} left={:.0}s{}{}",
            g["id"],
            str_of(&g["tenant"]),
            str_of(&g["agent"]),
            str_of(&g["tool"]),
            g["expires_in_seconds"].as_f64().unwrap_or(0.0),
            g["uses"].as_u64().map_or(String::new(), |u| format!(
                " uses left={}/{u}",
                g["uses_left"].as_u64().unwrap_or(u)
            )),
            g["pid"]
                .as_u64()
                .map_or(String::new(), |p| format!(" pid={p}")),
        );
    }
    if let Some(names) = s["dns"].as_object().filter(|m| !m.is_empty()) {
        println!("dns:");
        for (name, v) in names {
            let addrs: Vec<&str> = v["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .collect();
            let err = v["error"]
                .as_str()
                .map_or(String::new(), |e| format!(" (last error: {e})"));
            if let Some(by) = v["by_subject"].as_object() {
                // Per-agent DNS: each agent's own answers.
                if by.is_empty() {
                    println!("  {name} -> (not resolved by any agent)");
                }
                for (subject, addrs) in by {
                    let list: Vec<&str> = addrs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str())
                        .collect();
                    println!("  {name} -> {subject}: {}", list.join(", "));
                }
                continue;
            }
            println!(
                "  {name} -> {}{err}",
                if addrs.is_empty() {
                    "(none)".to_string()
                } else {
                    addrs.join(", ")
                }
            );
        }
    }
    for e in s["exports"].as_array().into_iter().flatten() {
        println!(
            "export:      {} sent={} dropped={} queue={}{}",
            str_of(&e["target"]),
            e["sent"],
            e["dropped"],
            e["queue"],
            e["last_error"]
                .as_str()
                .map_or(String::new(), |m| format!(" last error: {m}"))
        );
    }
    let unix = &s["unix_socket_fencing"];
    if unix["enforced"] == true {
        println!("unix:        fenced (cgroup/connect_unix, sendmsg_unix)");
    } else {
        println!(
            "unix:        NOT fenced: {}",
            unix["why"].as_str().unwrap_or("unknown")
        );
    }
    match s["dns_proxy"].as_object() {
        Some(p) => println!(
            "dns mode:    per-agent ({} subjects served, {} learned addresses, {} queries, {} refused, {} failed)",
            p["subjects_served"],
            p["learned_addresses"],
            p["stats"]["queries"],
            p["stats"]["refused"],
            p["stats"]["failed"]
        ),
        None => println!("dns mode:    shared"),
    }
    println!("agents:");
    for a in s["agents"].as_array().into_iter().flatten() {
        let task = a["task"]["text"]
            .as_str()
            .map_or(String::new(), |t| format!(" task={t:?}"));
        let tools = a["tools"].as_array().map_or(String::new(), |t| {
            format!(
                " tools={}",
                t.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        });
        println!(
            "  {:<32} mode={:<8} hardening={:<7} processes={}{}{}{}",
            str_of(&a["subject"]),
            str_of(&a["mode"]),
            str_of(&a["hardening"]),
            a["tracked_processes"],
            if a["suspended"] == true {
                " SUSPENDED"
            } else {
                ""
            },
            task,
            tools
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn str_of(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("-")
}
