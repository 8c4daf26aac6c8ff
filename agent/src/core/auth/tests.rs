use super::*;

/// A fresh nonce per call, as the peer client draws them.
fn nonce() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{:032x}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

#[test]
fn request_round_trip_and_tampering() {
    let k = ClusterKey::derive("secret-secret-secret");
    let a = k.sign_request("POST", "/peer/v1/join", "0000000000000001", 1000, &nonce(), b"{}");
    assert_eq!(k.verify_request("POST", "/peer/v1/join", &a, b"{}"), Ok(()));
    assert_eq!(k.verify_request("POST", "/peer/v1/join", &a, b"{ }"), Err(AuthError::BodyMismatch));
    // The headers alone are checked before the body is read: they must carry the proof.
    assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &a), Ok(()));
    let other_body = RequestAuth { body_sha256: body_digest(b"{ }"), ..a.clone() };
    assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &other_body), Err(AuthError::BadSignature));
    let short = RequestAuth { body_sha256: "00ff".into(), ..a.clone() };
    assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &short), Err(AuthError::Missing(HDR_BODY)));
    assert_eq!(k.verify_request("POST", "/peer/v1/leave", &a, b"{}"), Err(AuthError::BadSignature));
    assert_eq!(k.verify_request("GET", "/peer/v1/join", &a, b"{}"), Err(AuthError::BadSignature));
    let shifted = RequestAuth { time_ms: 1001, ..a.clone() };
    assert_eq!(k.verify_request("POST", "/peer/v1/join", &shifted, b"{}"), Err(AuthError::BadSignature));
    let other = ClusterKey::derive("another-secret-entirely");
    assert_eq!(other.verify_request("POST", "/peer/v1/join", &a, b"{}"), Err(AuthError::BadSignature));
    let garbage = RequestAuth { signature: "zz".into(), ..a };
    assert_eq!(k.verify_request("POST", "/peer/v1/join", &garbage, b"{}"), Err(AuthError::BadSignature));
}

#[test]
fn response_round_trip() {
    let k = ClusterKey::derive("secret-secret-secret");
    let s = k.sign_response("n1", 200, b"ok");
    assert_eq!(k.verify_response("n1", 200, b"ok", &s), Ok(()));
    assert_eq!(k.verify_response("n2", 200, b"ok", &s), Err(AuthError::BadSignature));
    assert_eq!(k.verify_response("n1", 500, b"ok", &s), Err(AuthError::BadSignature));
    assert_eq!(
        ClusterKey::derive("x-other-secret-xx").verify_response("n1", 200, b"ok", &s),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn replay_and_staleness_are_refused() {
    let k = ClusterKey::derive("secret-secret-secret");
    let g = ReplayGuard::default();
    let now = 1_000_000;
    let a = k.sign_request("POST", "/p", "0000000000000001", now, &nonce(), b"");
    assert_eq!(g.check(&a, now), Ok(()));
    assert_eq!(g.check(&a, now + 10), Err(AuthError::Replayed));
    let old = k.sign_request("POST", "/p", "0000000000000001", now - 61_000, &nonce(), b"");
    assert!(matches!(g.check(&old, now), Err(AuthError::Stale { .. })));
    let future = k.sign_request("POST", "/p", "0000000000000001", now + 61_000, &nonce(), b"");
    assert!(matches!(g.check(&future, now), Err(AuthError::Stale { .. })));
}

/// Found by fuzzing (peer_request): a signed request with time -9223372036854775808
/// overflowed `time - now` (a panic in debug builds; in release builds a time of exactly
/// `now + i64::MIN` wrapped to a skew whose `abs()` is negative, and passed as fresh).
#[test]
fn extreme_request_times_are_stale_not_an_overflow() {
    let k = ClusterKey::derive("secret-secret-secret");
    let g = ReplayGuard::default();
    let now = 1_750_000_000_000;
    for t in [i64::MIN, i64::MIN + now, i64::MIN + now + 1, i64::MAX, i64::MAX - 1] {
        let a = k.sign_request("POST", "/p", "0000000000000001", t, &nonce(), b"");
        assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })), "time {t}");
    }
    let h = AuthHeaders {
        to: Some("*"),
        time: Some("-9223372036854775808"),
        nonce: Some(""),
        body_sha256: Some(""),
        signature: Some(""),
        from: None,
        node_sig: None,
    };
    let a = parse_auth(h).unwrap();
    assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })));
    assert!(g.seen.lock().unwrap().is_empty());
}

#[test]
fn auth_headers_are_parsed_in_order() {
    let all = AuthHeaders {
        to: Some("t"),
        time: Some("12"),
        nonce: Some("n"),
        body_sha256: Some("d"),
        signature: Some("s"),
        from: Some("f"),
        node_sig: Some("g"),
    };
    let want = RequestAuth {
        to: "t".into(),
        time_ms: 12,
        nonce: "n".into(),
        body_sha256: "d".into(),
        signature: "s".into(),
        from: Some("f".into()),
        node_sig: Some("g".into()),
    };
    assert_eq!(parse_auth(all), Ok(want));
    // The sender's name and signature are optional: admission requests may lack them.
    let anonymous = parse_auth(AuthHeaders { from: None, node_sig: None, ..all }).unwrap();
    assert_eq!((anonymous.from, anonymous.node_sig), (None, None));
    assert_eq!(parse_auth(AuthHeaders::default()), Err(AuthError::Missing(HDR_TIME)));
    assert_eq!(parse_auth(AuthHeaders { time: Some("x"), ..all }), Err(AuthError::Missing(HDR_TIME)));
    assert_eq!(parse_auth(AuthHeaders { nonce: None, ..all }), Err(AuthError::Missing(HDR_NONCE)));
    assert_eq!(parse_auth(AuthHeaders { body_sha256: None, ..all }), Err(AuthError::Missing(HDR_BODY)));
    assert_eq!(parse_auth(AuthHeaders { to: None, ..all }), Err(AuthError::Missing(HDR_TO)));
    assert_eq!(parse_auth(AuthHeaders { signature: None, ..all }), Err(AuthError::Missing(HDR_AUTH)));
}

/// Issue 10, hole 5: a request is signed for one node. Another node refuses it (a captured
/// forwarded write cannot be replayed at another leader), changing the destination breaks the
/// signature, a route that needs a destination refuses `*`, and one gate serves every
/// listener of a node, so the same request at its second listener is a replay.
#[test]
fn a_request_is_for_one_node_and_one_gate_guards_its_listeners() {
    let k = ClusterKey::derive("secret-secret-secret");
    let keys = ClusterKeys::new("secret-secret-secret", &[]);
    let now = 1_000_000;
    let (a, b) = (Gate::new(keys.clone(), "000000000000000a"), Gate::new(keys.clone(), "000000000000000b"));
    let me = NodeKey::from_seed(&[3; 32]);
    let members = |_: NodeId| Sender::Member { node_key: me.public() };
    let signed = |path: &str, to: &str| {
        k.sign_request("POST", path, to, now, &nonce(), b"{}").sign_as("POST", path, "000000000000000c", &me)
    };
    let w = signed("/peer/v1/write", "000000000000000a");
    assert_eq!(
        b.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now, members),
        Err(AuthError::WrongDestination { to: "000000000000000a".into(), me: "000000000000000b".into() })
    );
    let readdressed = RequestAuth { to: "000000000000000b".into(), ..w.clone() };
    assert_eq!(
        b.admit_head("POST", "/peer/v1/write", &readdressed, &me.public(), false, false, now, members),
        Err(AuthError::BadSignature)
    );
    let any = signed("/peer/v1/write", ANY_NODE);
    assert_eq!(
        a.admit_head("POST", "/peer/v1/write", &any, &me.public(), false, false, now, members),
        Err(AuthError::Unaddressed("/peer/v1/write".into()))
    );
    // Refusals leave the nonce unrecorded: the right node still takes the request, once.
    assert_eq!(
        a.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now, members),
        Ok(Origin::Member(NodeId(12)))
    );
    let shared = std::sync::Arc::new(a);
    let (underlay, mesh) = (shared.clone(), shared);
    assert_eq!(
        mesh.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now + 5, members),
        Err(AuthError::Replayed)
    );
    let hello = k.sign_request("POST", "/peer/v1/hello", ANY_NODE, now, &nonce(), b"{}").sign_as(
        "POST",
        "/peer/v1/hello",
        "000000000000000c",
        &me,
    );
    let stranger = |_: NodeId| Sender::Stranger;
    let admit_hello =
        |g: &Gate| g.admit_head("POST", "/peer/v1/hello", &hello, &me.public(), true, true, now, stranger);
    assert_eq!(admit_hello(&underlay), Ok(Origin::SecretHolder));
    assert_eq!(admit_hello(&b), Ok(Origin::SecretHolder), "another node's own memory");
}

/// A node that missed an admission takes the vouched key of the new member on Raft routes
/// while its own membership is earlier than the vouched one, and never the key of a node the
/// later membership does not list or lists without a key.
#[test]
fn a_vouched_key_holds_until_this_nodes_membership_is_as_late() {
    use crate::core::raft_types::{LogId, PeerNode, StoredMembership};
    let log = |term: u64, index: u64| LogId::new(openraft::CommittedLeaderId::new(term, NodeId(0)), index);
    let membership = |at: LogId, members: &[(u64, &str)]| {
        let nodes: std::collections::BTreeMap<NodeId, PeerNode> =
            members.iter().map(|(id, key)| (NodeId(*id), PeerNode::new("10.0.0.1:7600", *key))).collect();
        let voters = nodes.keys().copied().collect::<std::collections::BTreeSet<_>>();
        StoredMembership::new(Some(at), openraft::Membership::new(vec![voters], nodes))
    };
    let mine = membership(log(2, 10), &[(1, "k1"), (2, "k2"), (3, "k3")]);
    let theirs = std::collections::BTreeMap::from([
        (NodeId(1), "k1".to_string()),
        (NodeId(4), "k4".to_string()),
        (NodeId(5), String::new()),
    ]);
    let vouch = |mine: &StoredMembership, voucher: u64, key: &str, at: LogId| {
        VouchedKeys::from_answer(mine, NodeId(voucher), key, Some(at), &theirs)
    };
    // Only the later membership's members this node does not list, and only with a key.
    let v = vouch(&mine, 1, "k1", log(2, 12)).unwrap();
    assert_eq!(v.keys, std::collections::BTreeMap::from([(NodeId(4), "k4".into())]));
    assert_eq!(vouch(&mine, 1, "k1", log(2, 10)), None, "not later");
    assert_eq!(vouch(&mine, 1, "k1", log(1, 11)), None, "an earlier term is earlier, whatever its index");
    assert_eq!(vouch(&mine, 9, "k9", log(2, 12)), None, "not a member");
    assert_eq!(vouch(&mine, 1, "k2", log(2, 12)), None, "not with that key");
    assert_eq!(VouchedKeys::from_answer(&mine, NodeId(1), "k1", None, &theirs), None, "no membership");
    // A later term is later, even at a lower index (this node's own entry was never committed).
    assert!(vouch(&mine, 1, "k1", log(3, 8)).is_some());
    // Taken while this node's membership is earlier and still lists the voucher with its key.
    assert_eq!(v.sender(&mine, NodeId(4)), Sender::Member { node_key: "k4".into() });
    assert_eq!(v.sender(&mine, NodeId(6)), Sender::Stranger);
    let caught_up = membership(log(2, 12), &[(1, "k1"), (2, "k2"), (3, "k3"), (4, "k4")]);
    assert_eq!(v.sender(&caught_up, NodeId(4)), Sender::Stranger, "lapses once this node is as late");
    // A voucher this node's log has removed since vouches for nobody any more (a removed
    // node could otherwise keep a key of its own in the door by vouching for it).
    let voucher_removed = membership(log(2, 11), &[(2, "k2"), (3, "k3")]);
    assert_eq!(v.sender(&voucher_removed, NodeId(4)), Sender::Stranger);
    // The later of two vouches is kept.
    let later = VouchedKeys { log_id: log(3, 1), ..v.clone() };
    assert_eq!(v.clone().newer(Some(later.clone())), later);
    assert_eq!(later.clone().newer(Some(v.clone())), later);
    assert_eq!(v.clone().newer(None), v);
}

/// Issue 10, design change 1: the secret only admits. Who sent a request is the node whose
/// key signed it, as this node's membership records it (the table in the module comment).
#[test]
fn the_sender_is_the_member_whose_key_signed_it() {
    let k = ClusterKey::derive("secret-secret-secret");
    let now = 1_000_000;
    let gate = Gate::new(ClusterKeys::new("secret-secret-secret", &[]), "000000000000000a");
    let (alice, mallory) = (NodeKey::from_seed(&[1; 32]), NodeKey::from_seed(&[2; 32]));
    let alice_id = "0000000000000001";
    let membership = |id: NodeId| match id.get() {
        1 => Sender::Member { node_key: alice.public() },
        2 => Sender::Member { node_key: String::new() },
        _ => Sender::Stranger,
    };
    let request = |path: &str, from: Option<(&str, &NodeKey)>| {
        let a = k.sign_request("POST", path, "000000000000000a", now, &nonce(), b"{}");
        match from {
            Some((id, key)) => a.sign_as("POST", path, id, key),
            None => a,
        }
    };
    let write = "/peer/v1/write";
    // Over a channel whose TLS handshake proved `channel`.
    let admit_on = |a: &RequestAuth, channel: &NodeKey, admission: bool, sender: &dyn Fn(NodeId) -> Sender| {
        gate.admit_head("POST", &a_path(a, admission), a, &channel.public(), admission, false, now, sender)
    };
    // Over a channel of the key that signed it.
    let admit = |a: &RequestAuth, admission: bool, sender: &dyn Fn(NodeId) -> Sender| {
        let signer =
            if a.verify_node_sig("POST", &a_path(a, admission), &alice.public()).is_ok() { &alice } else { &mallory };
        admit_on(a, signer, admission, sender)
    };
    fn a_path(_: &RequestAuth, admission: bool) -> String {
        if admission { "/peer/v1/join".into() } else { "/peer/v1/write".into() }
    }
    // A member's own signature: its request is its.
    assert_eq!(admit(&request(write, Some((alice_id, &alice))), false, &membership), Ok(Origin::Member(NodeId(1))));
    // A holder of the secret signing as alice with another key; alice's signature over
    // another sender name; and a signature of no known member: all refused.
    assert_eq!(
        admit(&request(write, Some((alice_id, &mallory))), false, &membership),
        Err(AuthError::BadNodeSignature(alice_id.into()))
    );
    // (Renamed, the signature verifies with no key, alice's channel's included.)
    let renamed = RequestAuth { from: Some("0000000000000003".into()), ..request(write, Some((alice_id, &alice))) };
    assert_eq!(
        admit_on(&renamed, &alice, false, &membership),
        Err(AuthError::NotTheChannelKey("0000000000000003".into()))
    );
    // A removed node knows the secret and its own key, but is no member: refused on member
    // routes; it may still discover and ask to join (as a new node) on admission routes.
    let removed = request(write, Some(("0000000000000009", &mallory)));
    assert_eq!(admit(&removed, false, &membership), Err(AuthError::NotAMember("0000000000000009".into())));
    let removed_join = request("/peer/v1/join", Some(("0000000000000009", &mallory)));
    assert_eq!(admit(&removed_join, true, &membership), Ok(Origin::SecretHolder));
    // No sender at all: refused everywhere (the agent signs every request, and the signature
    // is what binds a request to its TLS channel).
    assert_eq!(admit(&request(write, None), false, &membership), Err(AuthError::Anonymous(write.into())));
    let join = "/peer/v1/join";
    assert_eq!(admit(&request(join, None), true, &membership), Err(AuthError::Anonymous(join.into())));
    // Design change 2: a request signed by one key over a channel of another was relayed
    // (a holder of the secret in the middle): refused, whether the signer is a member or a
    // joiner, and on a node in no cluster yet too.
    let alices = request(write, Some((alice_id, &alice)));
    assert_eq!(admit_on(&alices, &mallory, false, &membership), Err(AuthError::NotTheChannelKey(alice_id.into())));
    let joiner = request(join, Some(("0000000000000009", &alice)));
    assert_eq!(
        admit_on(&joiner, &mallory, true, &membership),
        Err(AuthError::NotTheChannelKey("0000000000000009".into()))
    );
    assert_eq!(
        admit_on(&alices, &mallory, false, &|_| Sender::Unjoined),
        Err(AuthError::NotTheChannelKey(alice_id.into()))
    );
    // A member recorded without a key (an agent from before node keys) is refused.
    assert_eq!(
        admit(&request(write, Some(("0000000000000002", &mallory))), false, &membership),
        Err(AuthError::NoNodeKey("0000000000000002".into()))
    );
    // A member's signature is checked on admission routes too.
    assert_eq!(
        admit(&request("/peer/v1/join", Some((alice_id, &mallory))), true, &membership),
        Err(AuthError::BadNodeSignature(alice_id.into()))
    );
    // A node in no cluster yet knows no keys: the secret is all it checks.
    assert_eq!(
        admit(&request(write, Some(("0000000000000009", &mallory))), false, &|_| Sender::Unjoined),
        Ok(Origin::SecretHolder)
    );
    // The node signature covers the body digest and the destination, as the MAC does.
    let signed = request(write, Some((alice_id, &alice)));
    let other_body = RequestAuth { body_sha256: body_digest(b"[]"), ..signed.clone() };
    assert_eq!(
        other_body.verify_node_sig("POST", write, &alice.public()),
        Err(AuthError::BadNodeSignature(alice_id.into()))
    );
    assert_eq!(
        signed.verify_node_sig("POST", "/peer/v1/read", &alice.public()),
        Err(AuthError::BadNodeSignature(alice_id.into()))
    );
    assert_eq!(signed.verify_node_sig("POST", write, &alice.public()), Ok(()));
    assert!(is_node_key(&alice.public()) && !is_node_key("not a key") && !is_node_key(""));
    assert!(!format!("{alice:?}").contains(&hex(&[1; 32])), "the private key is not in Debug output");
}

/// Rotating the cluster secret: a node that signs with the new secret and still accepts the
/// old one takes requests signed with either, and answers each with the key that verified
/// it, so a node that knows only one of them reads the answer.
#[test]
fn a_node_accepts_the_secrets_of_a_rotation_and_answers_in_the_requests_key() {
    let (old, new) = ("old-secret-old-secret", "new-secret-new-secret");
    let rotating = ClusterKeys::new(new, &[old.to_string()]);
    let only_old = ClusterKeys::new(old, &[]);
    let a = only_old.primary().sign_request("POST", "/peer/v1/hello", ANY_NODE, 1, &nonce(), b"{}");
    let key = rotating.verify_request_head("POST", "/peer/v1/hello", &a).expect("the old secret is accepted");
    assert_eq!(key.fingerprint(), only_old.primary().fingerprint());
    let answer = key.sign_response(&a.nonce, 200, b"{}");
    assert_eq!(only_old.verify_response(&a.nonce, 200, b"{}", &answer), Ok(()));
    assert_eq!(rotating.verify_response(&a.nonce, 200, b"{}", &answer), Ok(()));
    assert_eq!(rotating.fingerprints(), [ClusterKey::derive(new).fingerprint(), ClusterKey::derive(old).fingerprint()]);
    // A third secret is neither.
    let other = ClusterKeys::new("other-secret-other-secret", &[]);
    let b = other.primary().sign_request("POST", "/peer/v1/hello", ANY_NODE, 1, &nonce(), b"{}");
    assert_eq!(rotating.verify_request_head("POST", "/peer/v1/hello", &b).err(), Some(AuthError::BadSignature));
    assert_eq!(
        only_old.verify_response(&b.nonce, 200, b"{}", &other.primary().sign_response(&b.nonce, 200, b"{}")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn nonce_memory_is_bounded() {
    let g = ReplayGuard::default();
    let k = ClusterKey::derive("secret-secret-secret");
    // Old entries are pruned once the table is half full.
    for i in 0..(MAX_NONCES / 2 + 10) {
        let a = RequestAuth {
            to: ANY_NODE.into(),
            time_ms: 0,
            nonce: format!("{}", i),
            body_sha256: String::new(),
            signature: String::new(),
            from: None,
            node_sig: None,
        };
        g.check(&a, 0).unwrap();
    }
    let fresh = k.sign_request("POST", "/p", "0000000000000001", 120_000, &nonce(), b"");
    assert_eq!(g.check(&fresh, 120_000), Ok(()));
    assert!(g.seen.lock().unwrap().len() < 10);
}

#[test]
fn fingerprint_differs_per_secret_and_hides_the_key() {
    let a = ClusterKey::derive("secret-secret-secret");
    let b = ClusterKey::derive("secret-secret-secreT");
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().len(), 8);
    assert_eq!(format!("{a:?}"), "ClusterKey(..)");
}
