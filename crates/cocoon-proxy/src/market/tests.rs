use std::time::Duration;

use super::*;

fn offer(model: &str, price: u64) -> Vec<Offer> {
    vec![Offer {
        model: model.into(),
        context_length: 2048,
        price,
    }]
}

fn ask<'a>(model: &'a str, max_price: Option<u64>, exclude: &'a [u64]) -> Ask<'a> {
    Ask {
        model,
        max_price,
        prefix: None,
        tokens: 64,
        exclude,
        min_context: 0,
        max_context: None,
        only: None,
    }
}

fn served(market: &Market<()>, seller: &Seller<()>, ttft_ms: u64, tps: f64, times: usize) {
    for _ in 0..times {
        market.record(
            seller,
            Outcome::Served {
                ttft: Duration::from_millis(ttft_ms),
                tokens_per_sec: Some(tps),
            },
        );
    }
}

#[test]
fn the_price_cap_filters_and_the_floor_raises() {
    let m = Market::<()>::new();
    m.set_floor(20);
    let cheap = m.add([1; 32], "cheap".into(), 4, offer("m", 10), ());
    let dear = m.add([2; 32], "dear".into(), 4, offer("m", 50), ());
    // The cheap one asks below the floor: it is served at the floor.
    let g = m.pick(&ask("m", Some(20), &[])).unwrap();
    assert_eq!((g.seller().id, g.price), (cheap.id, 20));
    drop(g);
    assert_eq!(
        m.pick(&ask("m", Some(19), &[])).unwrap_err(),
        NoPick::TooExpensive { cheapest: 20 }
    );
    // Only the dear one is left once the cheap one was tried.
    let g = m.pick(&ask("m", None, &[cheap.id])).unwrap();
    assert_eq!((g.seller().id, g.price), (dear.id, 50));
    assert_eq!(
        m.pick(&ask("m", Some(40), &[cheap.id])).unwrap_err(),
        NoPick::NoneAvailable
    );
    assert_eq!(
        m.pick(&ask("other", None, &[])).unwrap_err(),
        NoPick::UnknownModel
    );
    assert_eq!(m.highest_price("m", None), Some(50));
    assert_eq!(m.highest_price("m", Some(30)), Some(20));
    let listed = m.models();
    assert_eq!(listed.models[0].card.min_price, 20);
    assert_eq!(listed.models[0].max_price, 50);
    assert_eq!(listed.models[0].workers, 2);
}

#[test]
fn faster_and_more_reliable_workers_win_at_equal_price_and_load_spreads() {
    let m = Market::<()>::new();
    let slow = m.add([1; 32], "slow".into(), 4, offer("m", 0), ());
    let fast = m.add([2; 32], "fast".into(), 4, offer("m", 0), ());
    served(&m, &slow, 800, 10.0, 10);
    served(&m, &fast, 100, 60.0, 10);
    let g = m.pick(&ask("m", None, &[])).unwrap();
    assert_eq!(g.seller().id, fast.id);
    // Loaded enough, the fast one yields to the slow one: (1 + 41/4) × 1.25 s > 6.2 s.
    let held: Vec<_> = (0..40).map(|_| m.take(fast.clone(), 0, 64)).collect();
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, slow.id);
    drop(held);
    drop(g);
    // Stalls cost the fast one its lead.
    for _ in 0..20 {
        m.record(&fast, Outcome::Stalled);
    }
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, slow.id);
    // Unhealthy workers are not picked at all.
    slow.set_healthy(false);
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, fast.id);
}

#[test]
fn long_answers_in_flight_weigh_more_than_short_ones() {
    let m = Market::<()>::new();
    let a = m.add([1; 32], "a".into(), 4, offer("m", 0), ());
    let b = m.add([2; 32], "b".into(), 4, offer("m", 0), ());
    served(&m, &a, 100, 50.0, 10);
    served(&m, &b, 100, 50.0, 10);
    // Both run two requests; a's are long ones.
    let held = [
        m.take(a.clone(), 0, 1000),
        m.take(a.clone(), 0, 1000),
        m.take(b.clone(), 0, 10),
        m.take(b.clone(), 0, 10),
    ];
    assert_eq!((a.in_flight(), b.in_flight()), (2, 2));
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, b.id);
    drop(held);
    assert_eq!((a.in_flight_tokens(), b.in_flight_tokens()), (0, 0));
}

#[test]
fn context_floors_and_ceilings_keep_workers_out() {
    let m = Market::<()>::new();
    let short = m.add([1; 32], "short".into(), 4, offer("m", 20), ());
    let mut long_offer = offer("m", 40);
    long_offer[0].context_length = 8192;
    let long = m.add([2; 32], "long".into(), 4, long_offer, ());
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, short.id);
    let needs_more = Ask {
        min_context: 2049,
        ..ask("m", None, &[])
    };
    assert_eq!(m.pick(&needs_more).unwrap().seller().id, long.id);
    let too_much = Ask {
        min_context: 8193,
        ..ask("m", None, &[])
    };
    assert_eq!(m.pick(&too_much).unwrap_err(), NoPick::NoneAvailable);
    // A ceiling keeps long contexts out (what a reservation for a shorter one covers).
    let held = Ask {
        max_context: Some(8191),
        ..ask("m", None, &[])
    };
    for _ in 0..8 {
        assert_eq!(m.pick(&held).unwrap().seller().id, short.id);
    }
    let between = Ask {
        min_context: 2049,
        ..held
    };
    assert_eq!(m.pick(&between).unwrap_err(), NoPick::NoneAvailable);
    // What a reservation chooses from: each affordable worker's price and context.
    let mut offers = m.offers_within("m", None);
    offers.sort_unstable();
    assert_eq!(offers, [(20, 2048), (40, 8192)]);
    assert_eq!(m.offers_within("m", Some(30)), [(20, 2048)]);
    assert!(m.offers_within("other", None).is_empty());
}

#[test]
fn twice_the_price_needs_twice_the_speed() {
    let m = Market::<()>::new();
    let cheap = m.add([1; 32], "cheap".into(), 4, offer("m", 20), ());
    let dear = m.add([2; 32], "dear".into(), 4, offer("m", 40), ());
    served(&m, &cheap, 500, 20.0, 20);
    served(&m, &dear, 400, 25.0, 20);
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, cheap.id);
    served(&m, &dear, 50, 200.0, 200);
    assert_eq!(m.pick(&ask("m", None, &[])).unwrap().seller().id, dear.id);
}

#[test]
fn a_shared_prefix_sticks_to_its_worker_within_capacity() {
    let m = Market::<()>::new();
    let a = m.add([1; 32], "a".into(), 2, offer("m", 0), ());
    let b = m.add([2; 32], "b".into(), 2, offer("m", 0), ());
    let with_prefix = Ask {
        prefix: Some(42),
        ..ask("m", None, &[])
    };
    let first = m.pick(&with_prefix).unwrap();
    let owner = first.seller().id;
    // Without affinity the idle one would win now; with it the owner keeps the prefix.
    let second = m.pick(&with_prefix).unwrap();
    assert_eq!(second.seller().id, owner);
    // At capacity (2 in flight) it goes elsewhere, and the prefix moves with it.
    let third = m.pick(&with_prefix).unwrap();
    assert_ne!(third.seller().id, owner);
    assert!([a.id, b.id].contains(&third.seller().id));
    drop((first, second));
    assert_eq!(m.pick(&with_prefix).unwrap().seller().id, third.seller().id);
}

#[test]
fn many_workers_are_sampled_and_the_best_are_found() {
    let m = Market::<()>::new();
    let sellers: Vec<_> = (0..5_000u32)
        .map(|i| {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            m.add(
                key,
                format!("w{i}"),
                8,
                offer("m", 20 + u64::from(i % 7)),
                (),
            )
        })
        .collect();
    for s in &sellers {
        served(&m, s, 500, 20.0, 3);
    }
    let star = &sellers[4321];
    served(&m, star, 20, 400.0, 50);
    // The leaders find the one outstanding worker among thousands.
    let g = m.pick(&ask("m", None, &[])).unwrap();
    assert_eq!(g.seller().id, star.id);
    // A cap below its price keeps it out; the pick stays within the cap.
    let g = m.pick(&ask("m", Some(21), &[])).unwrap();
    assert!(g.price <= 21);
}

#[test]
fn reputation_survives_a_restart_and_a_reconnection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reputation.redb");
    {
        let m = Market::<()>::persistent(&path).unwrap();
        let w = m.add([9; 32], "w".into(), 1, offer("m", 0), ());
        for _ in 0..4 {
            m.record(&w, Outcome::Stalled);
        }
        // Leaving and coming back keeps the record.
        m.remove(w.id);
        let w = m.add([9; 32], "w".into(), 1, offer("m", 0), ());
        assert!(m.reputation(&w).success_rate < 0.1);
        m.save().unwrap();
    }
    let m = Market::<()>::persistent(&path).unwrap();
    let w = m.add([9; 32], "w".into(), 1, offer("m", 0), ());
    let r = m.reputation(&w);
    assert!(r.success_rate < 0.1 && r.samples > 11.0, "{r:?}");
    let fresh = m.add([8; 32], "new".into(), 1, offer("m", 0), ());
    assert_eq!(m.reputation(&fresh).success_rate, 1.0);
}
