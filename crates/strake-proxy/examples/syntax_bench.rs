//! Measures nft text syntax (`nft -f`) against the `nftables` crate's JSON (`nft -j -f`) for a
//! full sync of N Services x M endpoints, and a one-endpoint partial sync, inside a throwaway
//! network namespace (needs root; never touches the caller's namespace).
//!
//! `cargo run --release -p strake-proxy --example syntax_bench -- [SERVICES] [ENDPOINTS]`
//!
//! The JSON document holds the dominant objects only (per Service: its chain with the masquerade
//! rule and the endpoint-picking ladder, its endpoint chains with hairpin and DNAT rules, its
//! `service-ips` element), so it is a lower bound for the JSON path; the text script is the real
//! full sync of both tables.
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Instant;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, NgMode, Numgen, Payload, PayloadField, Prefix,
    Verdict,
};
use nftables::schema::{Chain, Element, NfCmd, NfListObject, NfObject, Rule};
use nftables::stmt::{JumpTarget, Match, NAT, Operator, Statement};
use nftables::types::NfFamily;
use strake_proxy::config::Config;
use strake_proxy::model::{Endpoint, Model, NodeInfo, Protocol, ServicePort, ServicePortName};
use strake_proxy::nft::ruleset::Ruleset;
use strake_proxy::nft::transaction::{apply_sync, full_script, partial_transaction};
use strake_proxy::nft::{Nft, NftCommand};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ipv4(base: u32, i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(base + i))
}

fn model(services: u32, endpoints: u32) -> Model {
    let mut model = Model {
        services: BTreeMap::new(),
        node: NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        },
    };
    for s in 0..services {
        let id = ServicePortName {
            namespace: format!("ns-{}", s % 100),
            name: format!("svc-{s}"),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        };
        let eps = (0..endpoints)
            .map(|e| Endpoint {
                ip: ipv4(u32::from(Ipv4Addr::new(10, 64, 0, 0)), s * endpoints + e),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(format!("node-{}", e % 50).into()),
                zone: None,
            })
            .collect();
        model.services.insert(
            id.clone(),
            ServicePort {
                id,
                port: 80,
                cluster_ips: vec![ipv4(u32::from(Ipv4Addr::new(10, 96, 0, 0)), s)],
                external_ips: vec![],
                load_balancer_ips: vec![],
                node_port: None,
                affinity_timeout_secs: None,
                external_policy_local: false,
                internal_policy_local: false,
                load_balancer_source_ranges: vec![],
                health_check_node_port: None,
                endpoints: eps,
            },
        );
    }
    model
}

const T: &str = "strake-proxy";

fn field<'a>(protocol: &'a str, field: &'a str) -> Expression<'a> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn eq<'a>(left: Expression<'a>, right: Expression<'a>, op: Operator) -> Statement<'a> {
    Statement::Match(Match { left, right, op })
}

fn add(obj: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(obj))
}

fn rule(chain: &str, expr: Vec<Statement<'static>>) -> NfObject<'static> {
    add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: T.into(),
        chain: chain.to_string().into(),
        expr: expr.into(),
        ..Rule::default()
    }))
}

fn chain(name: &str) -> NfObject<'static> {
    add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: T.into(),
        name: name.to_string().into(),
        ..Chain::default()
    }))
}

/// The JSON document, built with the `nftables` crate's types and serialized once. That crate
/// (0.6) has no `verdict` set type, so the verdict map is declared with a raw JSON object spliced
/// in front; endpoints are picked with the same rule ladder as the text path (nft 1.0.6's JSON
/// cannot declare a numgen-keyed named map at all: "unqualified type integer").
fn json_document(model: &Model) -> String {
    let head = serde_json::json!([
        { "add": { "table": { "family": "ip", "name": T } } },
        { "add": { "map": { "family": "ip", "table": T, "name": "service-ips",
            "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict" } } },
    ]);
    let mut objects = vec![chain("mark-for-masquerade")];
    let jump_masq = || {
        Statement::Jump(JumpTarget {
            target: "mark-for-masquerade".into(),
        })
    };
    for svc in model.services.values() {
        let base = format!("{}/{}/tcp/http", svc.id.namespace, svc.id.name);
        let svc_chain = format!("svc-{base}");
        let cip = svc.cluster_ips[0].to_string();
        objects.push(chain(&svc_chain));
        let mut ladder = Vec::new();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let ep_chain = format!("ep-{base}__{}/{}", ep.ip, ep.port);
            objects.push(chain(&ep_chain));
            objects.push(rule(
                &ep_chain,
                vec![
                    eq(
                        field("ip", "saddr"),
                        Expression::String(ep.ip.to_string().into()),
                        Operator::EQ,
                    ),
                    jump_masq(),
                ],
            ));
            objects.push(rule(
                &ep_chain,
                vec![
                    eq(
                        Expression::Named(NamedExpression::Meta(Meta {
                            key: MetaKey::L4proto,
                        })),
                        Expression::String("tcp".into()),
                        Operator::EQ,
                    ),
                    Statement::DNAT(Some(NAT {
                        addr: Some(Expression::String(ep.ip.to_string().into())),
                        family: None,
                        port: Some(Expression::Number(u32::from(ep.port))),
                        flags: None,
                    })),
                ],
            ));
            let goto = Statement::Goto(JumpTarget {
                target: ep_chain.into(),
            });
            let n = svc.endpoints.len();
            if i + 1 == n {
                ladder.push(vec![goto]);
            } else {
                ladder.push(vec![
                    eq(
                        Expression::Named(NamedExpression::Numgen(Numgen {
                            mode: NgMode::Random,
                            ng_mod: (n - i) as u32,
                            offset: None,
                        })),
                        Expression::Number(0),
                        Operator::EQ,
                    ),
                    goto,
                ]);
            }
        }
        objects.push(rule(
            &svc_chain,
            vec![
                eq(
                    field("ip", "daddr"),
                    Expression::String(cip.clone().into()),
                    Operator::EQ,
                ),
                eq(field("tcp", "dport"), Expression::Number(80), Operator::EQ),
                eq(
                    field("ip", "saddr"),
                    Expression::Named(NamedExpression::Prefix(Prefix {
                        addr: Box::new(Expression::String("10.244.0.0".into())),
                        len: 16,
                    })),
                    Operator::NEQ,
                ),
                jump_masq(),
            ],
        ));
        for stmts in ladder {
            objects.push(rule(&svc_chain, stmts));
        }
        objects.push(add(NfListObject::Element(Element {
            family: NfFamily::IP,
            table: T.into(),
            name: "service-ips".into(),
            elem: vec![Expression::List(vec![
                Expression::Named(NamedExpression::Concat(vec![
                    Expression::String(cip.into()),
                    Expression::String("tcp".into()),
                    Expression::Number(80),
                ])),
                Expression::Verdict(Verdict::Goto(JumpTarget {
                    target: svc_chain.into(),
                })),
            ])]
            .into(),
        })));
    }
    let body = serde_json::to_string(&objects).unwrap();
    let head = serde_json::to_string(&head).unwrap();
    format!(
        "{{\"nftables\":{},{}}}",
        &head[..head.len() - 1],
        &body[1..]
    )
}

fn apply(ns: &str, args: &[&str], script: &str) -> f64 {
    use std::io::Write;
    let started = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg("/usr/sbin/nft")
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let script = script.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let endpoints: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let config = Config {
        node_name: "node-a".into(),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all: false,
        nodeport_addresses: Default::default(),
    };
    println!("{services} services x {endpoints} endpoints");

    let t = Instant::now();
    let m = model(services, endpoints);
    let t_model = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ruleset = Ruleset::build(&m, &config);
    let t_ruleset = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let text = full_script(&ruleset);
    let t_text = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let json = json_document(&m);
    let t_json = t.elapsed().as_secs_f64();
    if let Ok(dir) = std::env::var("SYNTAX_BENCH_DUMP") {
        std::fs::write(format!("{dir}/full.nft"), &text).unwrap();
        std::fs::write(format!("{dir}/full.json"), &json).unwrap();
        return;
    }
    println!("synthetic model: {t_model:.3} s; Ruleset::build: {t_ruleset:.3} s");
    println!(
        "text: generate {t_text:.3} s, {} MB",
        text.len() / 1_000_000
    );
    println!(
        "json: generate {t_json:.3} s, {} MB",
        json.len() / 1_000_000
    );

    let name = format!("sproxy-bench-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    let ns = Netns(name);
    let t_apply_text = apply(&ns.0, &["-f", "/dev/stdin"], &text);
    println!("text: nft -f full sync {t_apply_text:.3} s");
    let _ = apply(
        &ns.0,
        &["-f", "/dev/stdin"],
        "delete table ip strake-proxy\ndelete table ip6 strake-proxy\n",
    );
    let t_apply_json = apply(&ns.0, &["-j", "-f", "/dev/stdin"], &json);
    println!("json: nft -j -f full sync {t_apply_json:.3} s");
    // The same content as text: nft's own listing of what the JSON created, fed back.
    let listing = NftCommand::in_netns(format!("/run/netns/{}", ns.0))
        .with_program("/usr/sbin/nft")
        .list_table(strake_proxy::model::IpFamily::V4, "strake-proxy")
        .unwrap();
    assert!(listing.contains("dnat to"), "JSON document did not load");
    let _ = apply(
        &ns.0,
        &["-f", "/dev/stdin"],
        "delete table ip strake-proxy\n",
    );
    let t_apply_listing = apply(&ns.0, &["-f", "/dev/stdin"], &listing);
    println!(
        "text, same content as the JSON document (block syntax): nft -f {t_apply_listing:.3} s, {} MB",
        listing.len() / 1_000_000
    );
    let _ = apply(
        &ns.0,
        &["-f", "/dev/stdin"],
        "delete table ip strake-proxy\n",
    );

    // A partial sync of one changed endpoint at this scale, through the real seam.
    let nft = NftCommand::in_netns(format!("/run/netns/{}", ns.0)).with_program("/usr/sbin/nft");
    let t = Instant::now();
    apply_sync(&nft, None, || ruleset.views()).unwrap();
    println!(
        "full sync (transaction + apply): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let mut m2 = m;
    if let Some(svc) = m2.services.values_mut().nth(services as usize / 2) {
        svc.endpoints[0].ip = "10.255.255.1".parse().unwrap();
    }
    let t = Instant::now();
    let ruleset2 = Ruleset::build(&m2, &config);
    let t_build2 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let script = partial_transaction(&ruleset, &ruleset2)
        .map(|tx| tx.to_string())
        .unwrap_or_default();
    let t_plan = t.elapsed().as_secs_f64();
    println!(
        "one endpoint changed: diff {t_plan:.3} s, {} bytes",
        script.len()
    );
    let t = Instant::now();
    let partial = partial_transaction(&ruleset, &ruleset2);
    let report = apply_sync(&nft, partial, || ruleset2.views()).unwrap();
    println!(
        "one endpoint changed: Ruleset::build {t_build2:.3} s, diff + apply {:.3} s ({} commands, full: {})",
        t.elapsed().as_secs_f64(),
        report.commands,
        report.full
    );
    let listing = nft
        .list_table(strake_proxy::model::IpFamily::V4, "strake-proxy")
        .unwrap();
    assert!(listing.contains("10.255.255.1"));
}
