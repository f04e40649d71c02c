use super::*;

fn settings(path: Option<PathBuf>) -> CacheSettings {
    CacheSettings {
        path,
        max_memory_bytes: 10_000,
        max_disk_bytes: 10_000,
        max_entry_bytes: 1 << 20,
        ttl: TtlRules::parse(&["demo.slow 60", "demo.* 1"]).unwrap(),
        policy: b"test".to_vec(),
    }
}

fn rules(lines: &[&str]) -> RuleSet {
    RuleSet::parse(lines).unwrap()
}

fn body(n: usize) -> Bytes {
    Bytes::from(vec![b'x'; n])
}

async fn miss(cache: &Arc<ResultCache>, key: CacheKey) -> Fill {
    match cache.begin(key).await {
        Begin::Miss(Some(fill)) => fill,
        other => panic!("expected a leading miss, got {other:?}"),
    }
}

#[test]
fn ttl_lines_parse_and_the_first_match_wins() {
    let ttl = TtlRules::parse(&["demo.slow 60", "demo.* 1"]).unwrap();
    assert_eq!(ttl.ttl_for("demo.slow"), Some(Duration::from_secs(60)));
    assert_eq!(ttl.ttl_for("demo.add"), Some(Duration::from_secs(1)));
    assert_eq!(ttl.ttl_for("other.add"), None);
    for bad in ["demo.*", "demo.* 0", "demo.* -1", "demo.* 1.5", " 5", ""] {
        assert!(TtlRules::parse(&[bad]).is_err(), "{bad:?}");
    }
}

#[test]
fn keys_differ_by_rules_kind_policy_and_request_never_by_anything_else() {
    let cache = ResultCache::open(settings(None)).unwrap();
    let a = rules(&["allow demo"]);
    let k = cache.key(Kind::Compat, &a, b"req");
    assert_eq!(k, cache.key(Kind::Compat, &rules(&["allow demo"]), b"req"));
    assert_ne!(k, cache.key(Kind::Native, &a, b"req"));
    assert_ne!(k, cache.key(Kind::Compat, &rules(&["allow *"]), b"req"));
    assert_ne!(k, cache.key(Kind::Compat, &rules(&["deny demo"]), b"req"));
    assert_ne!(k, cache.key(Kind::Compat, &rules(&["allow demo", "allow x"]), b"req"));
    assert_ne!(k, cache.key(Kind::Compat, &a, b"req2"));
    let other = ResultCache::open(CacheSettings { policy: b"code allowed".to_vec(), ..settings(None) }).unwrap();
    assert_ne!(k, other.key(Kind::Compat, &a, b"req"));
    // Length prefixes: moving a byte from one part to the next changes the key.
    assert_ne!(
        cache.key(Kind::Compat, &rules(&["allow ab"]), b"c"),
        cache.key(Kind::Compat, &rules(&["allow a"]), b"bc")
    );
    assert_eq!(CacheKey::from_hex(&k.hex()), Some(k));
    assert_eq!(CacheKey::from_hex(&k.hex().to_uppercase()), None);
}

#[tokio::test]
async fn miss_then_hit_then_expiry() {
    let cache = ResultCache::open(settings(None)).unwrap();
    let key = cache.key(Kind::Compat, &rules(&["allow demo"]), b"r");
    miss(&cache, key).await.commit(Kind::Compat, body(10), "demo.f".into(), Duration::from_millis(300));
    match cache.begin(key).await {
        Begin::Hit(e) => assert_eq!((&e.body[..], e.summary.as_str()), (&b"xxxxxxxxxx"[..], "demo.f")),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    drop(miss(&cache, key).await); // expired: a miss again
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.stores, s.memory.0), (1, 2, 1, 0));
}

#[tokio::test]
async fn the_memory_bound_evicts_the_least_recently_used() {
    let cache = ResultCache::open(settings(None)).unwrap();
    let k = |i: u8| cache.key(Kind::Compat, &RuleSet::default(), &[i]);
    for i in 0..3 {
        miss(&cache, k(i)).await.commit(Kind::Compat, body(3000), String::new(), Duration::from_secs(60));
    }
    assert!(matches!(cache.begin(k(0)).await, Begin::Hit(_))); // 0 is now the newest
    miss(&cache, k(3)).await.commit(Kind::Compat, body(3000), String::new(), Duration::from_secs(60));
    assert!(cache.stats().memory.1 <= 10_000);
    assert!(matches!(cache.begin(k(1)).await, Begin::Miss(Some(_))), "1 was the least recently used");
    for i in [0, 2, 3] {
        assert!(matches!(cache.begin(k(i)).await, Begin::Hit(_)), "{i}");
    }
    // Bigger than the memory bound and no disk: never stored.
    assert!(!cache.fits(20_000));
    miss(&cache, k(9)).await.commit(Kind::Compat, body(20_000), String::new(), Duration::from_secs(60));
    assert!(matches!(cache.begin(k(9)).await, Begin::Miss(Some(_))));
}

#[tokio::test]
async fn concurrent_misses_of_one_key_wait_for_one_computation() {
    let cache = ResultCache::open(settings(None)).unwrap();
    let key = cache.key(Kind::Native, &RuleSet::default(), b"same");
    let leader = miss(&cache, key).await;
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.begin(key).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()), "the others wait for the leader");
    tokio::task::spawn_blocking(move || {
        leader.commit(Kind::Native, body(5), String::new(), Duration::from_secs(60));
    })
    .await
    .unwrap();
    for w in waiters {
        assert!(matches!(w.await.unwrap(), Begin::Hit(_)));
    }
    assert_eq!(cache.stats().stores, 1);
}

#[tokio::test]
async fn a_leader_that_stores_nothing_releases_its_waiters_to_run_themselves() {
    let cache = ResultCache::open(settings(None)).unwrap();
    let key = cache.key(Kind::Compat, &RuleSet::default(), b"err");
    let leader = miss(&cache, key).await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.begin(key).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(leader); // e.g. the call raised: errors are not cached
                  // Released, it runs the call itself (leading a new computation: nobody else computes it).
    assert!(matches!(waiter.await.unwrap(), Begin::Miss(_)));
    // Nobody computes it now: the next caller leads again.
    let again = miss(&cache, key).await;
    again.never(); // its chain matches no ttl pattern
    assert!(matches!(cache.begin(key).await, Begin::Miss(None)), "a known skip does not wait or lead");
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart_and_drops_what_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let open = || ResultCache::open(settings(Some(dir.path().to_owned()))).unwrap();
    let cache = open();
    let k = |i: u8| cache.key(Kind::Compat, &RuleSet::default(), &[i]);
    let (k0, k1, k2) = (k(0), k(1), k(2));
    for key in [k0, k1, k2] {
        miss(&cache, key).await.commit(Kind::Compat, body(100), "demo.f".into(), Duration::from_secs(60));
    }
    drop(cache);
    // One entry truncated, one replaced by garbage, a writer's leftover.
    let p1 = disk::entry_path(dir.path(), &k1);
    let good = std::fs::read(&p1).unwrap();
    std::fs::write(&p1, &good[..good.len() / 2]).unwrap();
    let p2 = disk::entry_path(dir.path(), &k2);
    std::fs::write(&p2, b"\x80\x04garbage").unwrap();
    let cache = open();
    assert!(!p2.exists(), "a file whose header does not read is dropped at start");
    match cache.begin(k0).await {
        Begin::Hit(e) => assert_eq!((e.body.len(), e.summary.as_str()), (100, "demo.f")),
        other => panic!("{other:?}"),
    }
    // The truncated one passes the header scan but not the load.
    assert!(matches!(cache.begin(k1).await, Begin::Miss(Some(_))));
    assert!(!p1.exists(), "a corrupt entry is deleted when loaded");
    assert_eq!(cache.stats().dropped_files, 2, "the garbage file at start, the truncated one at load");
}

#[tokio::test]
async fn the_disk_bound_evicts_files() {
    let dir = tempfile::tempdir().unwrap();
    let cache =
        ResultCache::open(CacheSettings { max_memory_bytes: 100, ..settings(Some(dir.path().to_owned())) }).unwrap();
    let k = |i: u8| cache.key(Kind::Compat, &RuleSet::default(), &[i]);
    for i in 0..5 {
        miss(&cache, k(i)).await.commit(Kind::Compat, body(3000), String::new(), Duration::from_secs(60));
    }
    let (n, bytes) = disk::scan(dir.path()).unwrap().entries();
    assert!(bytes <= 10_000 && n == 3, "{n} files, {bytes} bytes");
    assert_eq!(cache.stats().memory.0, 0, "entries bigger than the memory bound live on disk only");
    assert!(matches!(cache.begin(k(4)).await, Begin::Hit(_)), "served from disk");
    assert!(matches!(cache.begin(k(0)).await, Begin::Miss(Some(_))), "the oldest file went");
}
