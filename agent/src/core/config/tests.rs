//! Config parsing and validation tests.

use super::*;

fn load_str(toml_text: &str, creds: &[(&str, &str)], o: &Overrides) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml_text).unwrap();
    let cdir = dir.path().join("creds");
    std::fs::create_dir(&cdir).unwrap();
    for (k, v) in creds {
        std::fs::write(cdir.join(k), v).unwrap();
    }
    Config::load(&path, true, Some(&cdir), o)
}

#[test]
fn a_written_config_file_reads_back_the_same() {
    let f = FileConfig {
        node_name: Some("n1".into()),
        state_dir: Some("/var/lib/clusteros".into()),
        join: Some(vec!["10.0.0.1:7600".into(), "10.0.0.2:7600".into()]),
        bootstrap_expect: Some(3),
        cluster_secret_file: Some("/etc/clusteros/secret".into()),
        manage_services: Some(ServiceMode::Off),
        raft: RaftTuning { heartbeat_ms: 100, ..Default::default() },
        health: HealthTuning { suspect_after_ms: 2_000, ..Default::default() },
        ..Default::default()
    };
    let text = f.to_toml();
    assert!(!text.contains("advertise_addr"), "unset keys are left out:\n{text}");
    assert_eq!(parse_toml(Path::new("agent.toml"), &text).unwrap(), f);
    assert_eq!(parse_toml(Path::new("agent.toml"), &FileConfig::default().to_toml()).unwrap(), FileConfig::default());
}

#[test]
fn defaults_without_any_input() {
    let c = Config::load(Path::new("/nonexistent/agent.toml"), false, None, &Overrides::default()).unwrap();
    assert_eq!(c.listen_addr, "0.0.0.0:7600".parse().unwrap());
    assert_eq!(c.max_voters, 3);
    assert_eq!(c.cluster_secret, None);
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert!(c.join.is_empty());
}

#[test]
fn missing_required_file_is_an_error_naming_the_path() {
    let e = Config::load(Path::new("/nonexistent/agent.toml"), true, None, &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/agent.toml"), "{e}");
}

#[test]
fn credentials_override_file_and_flags_override_credentials() {
    let text = "join = [\"10.0.0.1\"]\nbootstrap_expect = 5\ncluster_secret = \"file-secret-0123456789\"\n";
    let creds = [
        (credential::JOIN, "10.0.0.2:7000, 10.0.0.3\n"),
        (credential::BOOTSTRAP_EXPECT, "3\n"),
        (credential::CLUSTER_SECRET, "cred-secret-0123456789\n"),
    ];
    let c = load_str(text, &creds, &Overrides::default()).unwrap();
    assert_eq!(c.join, vec!["10.0.0.2:7000".to_string(), "10.0.0.3:7600".to_string()]);
    assert_eq!(c.bootstrap_expect, Some(3));
    assert_eq!(c.cluster_secret.as_deref(), Some("cred-secret-0123456789"));
    let o = Overrides { bootstrap_expect: Some(1), join: Some(vec![]), ..Default::default() };
    let c = load_str(text, &creds, &o).unwrap();
    assert_eq!(c.bootstrap_expect, Some(1));
    assert!(c.join.is_empty());
}

#[test]
fn unknown_keys_are_refused_with_the_key_named() {
    let e = load_str("bootstrap_expec = 3\n", &[], &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("bootstrap_expec"), "{e}");
}

#[test]
fn a_toml_error_names_line_and_key_but_never_shows_the_value() {
    // Issue 10, hole 7: the message goes to the journal and `clusteros status`.
    const SECRET: &str = "s3cr3t-s3cr3t-s3cr3t";
    for (text, key) in [
        (format!("node_name = \"n1\"\ncluster_secret = {SECRET}\n"), "line 2"),
        (format!("cluster_secret = \"{SECRET}\n"), "line 1"),
        (format!("manage_services = \"{SECRET}\"\n"), "manage_services"),
        (format!("bootstrap_expect = \"{SECRET}\"\n"), "bootstrap_expect"),
    ] {
        let e = load_str(&text, &[], &Overrides::default()).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "the value is shown: {e}");
        assert!(e.contains(key), "{key} is not named: {e}");
    }
    for (msg, want) in [
        (r#"invalid type: string "abc", expected a boolean"#, r#"invalid type: string "...", expected a boolean"#),
        ("unknown variant `abc`, expected one of `a`, `b`", "unknown variant `...`, expected one of `a`, `b`"),
        (r#"invalid value: string "abc"#, r#"invalid value: string "...""#),
        ("missing field `x`", "missing field `x`"),
    ] {
        assert_eq!(elide_values(msg), want);
    }
}

#[test]
fn short_secret_is_refused_with_the_fix() {
    let e = load_str("cluster_secret = \"short\"\n", &[], &Overrides::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("cluster_secret") && msg.contains("at least 16"), "{msg}");
}

#[test]
fn bad_values_name_their_key() {
    for (text, key) in [
        ("max_voters = 4\n", "max_voters"),
        ("bootstrap_expect = 0\n", "bootstrap_expect"),
        ("listen_addr = \"nope\"\n", "listen_addr"),
        ("advertise_addr = \"0.0.0.0:7600\"\n", "advertise_addr"),
        ("join = [\"a:b:c\"]\n", "join"),
        ("node_name = \"bad name\"\n", "node_name"),
        ("mesh_cidr = \"8.8.0.0/16\"\n", "mesh_cidr"),
        ("mesh_cidr = \"10.0.0.0/30\"\n", "mesh_cidr"),
        ("manage_services = \"maybe\"\n", "manage_services"),
        ("[raft]\nheartbeat_ms = 1000\nelection_timeout_min_ms = 1500\n", "raft.election_timeout_min_ms"),
        ("[health]\nsuspect_after_ms = 9000\nfailed_after_ms = 1000\n", "health"),
    ] {
        let e = load_str(text, &[], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
}

#[test]
fn bad_credential_number_names_the_credential() {
    let e = load_str("", &[(credential::BOOTSTRAP_EXPECT, "three")], &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("clusteros.bootstrap-expect"), "{e}");
}

#[test]
fn metrics_stay_on_loopback_and_the_mesh_unless_exposed() {
    let merge = |metrics_addr: Option<&str>, listen: Option<&str>| {
        let file = FileConfig { metrics_addr: metrics_addr.map(String::from), ..Default::default() };
        let o = Overrides { listen_addr: listen.map(String::from), ..Default::default() };
        Config::merge(file, Credentials::default(), &o)
    };
    // Not on the peer API's address, wherever that is.
    assert_eq!(merge(None, None).unwrap().metrics, MetricsListen::LoopbackAndMesh(7601));
    assert_eq!(merge(None, Some("192.0.2.7:7600")).unwrap().metrics, MetricsListen::LoopbackAndMesh(7601));
    assert_eq!(merge(Some("mesh"), None).unwrap().metrics, MetricsListen::LoopbackAndMesh(7601));
    assert_eq!(merge(Some("0.0.0.0:9100"), None).unwrap().metrics, MetricsListen::At("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(merge(Some("off"), None).unwrap().metrics, MetricsListen::Off);
    let e = merge(Some("nope"), None).unwrap_err().to_string();
    assert!(e.contains("metrics_addr") && e.contains("\"mesh\""), "{e}");
    // The unit grants no CAP_NET_BIND_SERVICE: a privileged port is refused with the reason.
    let e = merge(Some("0.0.0.0:80"), None).unwrap_err().to_string();
    assert!(e.contains("metrics_addr") && e.contains("below 1024"), "{e}");
    let e = merge(None, Some("0.0.0.0:443")).unwrap_err().to_string();
    assert!(e.contains("listen_addr") && e.contains("CAP_NET_BIND_SERVICE"), "{e}");
}

/// Found by fuzzing (config): "192.168.0.0/8" was accepted because only the address was
/// checked, and mesh addresses were then allocated from 192.0.0.0/8, which is public.
#[test]
fn the_whole_mesh_network_must_be_private() {
    for bad in ["192.168.0.0/8", "172.16.0.0/8", "172.16.0.0/11", "192.168.1.0/15"] {
        let e = parse_cidr(bad).unwrap_err();
        assert!(e.to_string().contains("use a private network"), "{bad}: {e}");
    }
    let e = load_str("mesh_cidr = \"192.168.0.0/8\"\n", &[], &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("mesh_cidr"), "{e}");
    for ok in ["10.0.0.0/8", "10.90.0.0/16", "172.16.0.0/12", "172.31.255.0/24", "192.168.0.0/16", "10.90.5.5/16"] {
        assert!(parse_cidr(ok).is_ok(), "{ok}");
    }
}

#[test]
fn join_addresses_are_normalized() {
    assert_eq!(normalize_join_addr("node1").unwrap(), "node1:7600");
    assert_eq!(normalize_join_addr("node1:9000").unwrap(), "node1:9000");
    assert_eq!(normalize_join_addr("::1").unwrap(), "[::1]:7600");
    assert_eq!(normalize_join_addr("[::1]:8000").unwrap(), "[::1]:8000");
    assert!(normalize_join_addr("").is_err());
    assert!(normalize_join_addr("host:notaport").is_err());
    assert_eq!(split_list("a, b\nc,,"), vec!["a", "b", "c"]);
}
