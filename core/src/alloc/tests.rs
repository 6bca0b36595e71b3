use super::*;

#[test]
fn generated_macs_are_stable_local_and_avoid_other_owners() {
    let seed = mac_seed("ns", "vm1", "nic-1");
    assert_eq!(seed, mac_seed("ns", "vm1", "nic-1"));
    assert_ne!(seed, mac_seed("ns", "vm1", "nic-2"));
    let free = |_: MacAddr| None;
    let a = generate_mac("ns/vm1", seed, free).expect("generated");
    assert!(a.is_locally_administered_unicast(), "{a}");
    // The same owner asking again (its own claim holds the MAC) gets the same MAC.
    let again = generate_mac("ns/vm1", seed, |m| {
        (m == a).then(|| Some("ns/vm1".to_string()))
    })
    .expect("same owner again");
    assert_eq!(again, a);
    // Another owner with the same seed gets another MAC, not a conflict; so does a MAC
    // held with no known owner.
    let held_by_vm1 = |m: MacAddr| (m == a).then(|| Some("ns/vm1".to_string()));
    let b = generate_mac("ns/other", seed, held_by_vm1).expect("other owner");
    assert_ne!(b, a);
    assert!(b.is_locally_administered_unicast(), "{b}");
    let c = generate_mac("ns/vm1", seed, |m| (m == a).then_some(None)).expect("ownerless");
    assert_ne!(c, a);
    // When every candidate is held, the refusal says so.
    let all = generate_mac("ns/x", seed, |_| Some(Some("ns/y".to_string())));
    assert_eq!(all, Err(AllocError::NoMacAvailable));
}
