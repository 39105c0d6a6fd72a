//! GoRouter's hash-based routing (Cloud Foundry RFC 0042, route option `loadbalancing: hash`):
//! requests carrying the same value of a route's `hash_header` go to the same instance, chosen
//! through a Maglev lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4).
//!
//! The table is built exactly as GoRouter builds it, so that GoRouters and gateways behind one
//! load balancer send a tenant to the same instance: instances are named by their
//! `private_instance_id` and sorted by it; each one's preference list is `(offset + j·skip) mod M`
//! with `offset = h mod M` and `skip = h mod (M−1) + 1`, `h` the 64-bit FNV-1a hash of its name;
//! the instances take turns claiming their next free slot until all `M = 3001` are claimed. A
//! request's slot is the FNV-1a hash of the header value mod `M`. Retries, and requests whose
//! instance is full or busier than the route's `hash_balance` allows, go to the next instance in
//! table order from that slot, so a tenant's overflow also lands on one instance.

use std::hash::Hasher;

/// The lookup table's size: GoRouter's, a prime about a hundred times the instances a route is
/// expected to have.
pub const TABLE_SIZE: usize = 3001;

/// 64-bit FNV-1a, the hash GoRouter uses for instance names and header values.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// A Maglev lookup table over one pool's endpoints.
#[derive(Debug, PartialEq, Eq)]
pub struct Maglev {
    /// For each slot, the position in the pool's endpoint list of the endpoint owning it.
    slots: Box<[u32]>,
}

impl Maglev {
    /// The table for endpoints named `names` (index = position in the pool). Of endpoints with
    /// the same name only the first is in the table, as GoRouter keeps one per instance id.
    /// `None` without endpoints.
    pub fn new(names: &[&str]) -> Option<Maglev> {
        Self::with_size(names, TABLE_SIZE)
    }

    fn with_size(names: &[&str], m: usize) -> Option<Maglev> {
        let mut members: Vec<(&str, u32)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, i as u32))
            .collect();
        // Stable: among equal names the first position stays.
        members.sort_by(|a, b| a.0.cmp(b.0));
        members.dedup_by(|later, first| later.0 == first.0);
        // At most one instance per slot (GoRouter refuses to add more).
        members.truncate(m);
        if members.is_empty() {
            return None;
        }
        let m64 = m as u64;
        let prefs: Vec<(u64, u64)> = members
            .iter()
            .map(|(name, _)| {
                let h = fnv1a(name.as_bytes());
                (h % m64, h % (m64 - 1) + 1)
            })
            .collect();
        const FREE: u32 = u32::MAX;
        let mut slots = vec![FREE; m];
        let mut next = vec![0u64; members.len()];
        let mut claimed = 0;
        loop {
            for (i, &(offset, skip)) in prefs.iter().enumerate() {
                // `skip` is below the prime `m`, so each preference list visits every slot once;
                // a slot is still free, so this ends within `m` steps of the list.
                let mut slot = ((offset + next[i] * skip) % m64) as usize;
                while slots[slot] != FREE {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m64) as usize;
                }
                slots[slot] = members[i].1;
                next[i] += 1;
                claimed += 1;
                if claimed == m {
                    return Some(Maglev {
                        slots: slots.into(),
                    });
                }
            }
        }
    }

    /// The slot of a request whose hash header has the value `key`.
    pub fn slot(&self, key: &[u8]) -> usize {
        (fnv1a(key) % self.slots.len() as u64) as usize
    }

    /// The endpoint (its position in the pool) that owns `slot`.
    pub fn owner(&self, slot: usize) -> usize {
        self.slots[slot] as usize
    }

    /// Endpoint positions in table order from `slot`, once per slot (an endpoint repeats).
    pub fn from(&self, slot: usize) -> impl Iterator<Item = usize> + '_ {
        let (before, after) = self.slots.split_at(slot);
        after.iter().chain(before).map(|&i| i as usize)
    }

    /// Slots in the table.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANTS: [&str; 8] = [
        "tenant-1", "tenant-2", "tenant-3", "tenant-4", "tenant-5", "tenant-6", "acme", "globex",
    ];

    fn owner<'a>(t: &Maglev, names: &[&'a str], key: &str) -> &'a str {
        names[t.owner(t.slot(key.as_bytes()))]
    }

    #[test]
    fn fnv1a_is_the_64_bit_variant() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// The same table as GoRouter's: this vector came out of GoRouter's own `route/maglev.go`
    /// (routing-release, logging removed, run with Go 1.19) and, independently, out of the
    /// paper's pseudo-code written in Python; both gave these slots and owners.
    #[test]
    fn the_table_is_gorouters() {
        // Positions in the pool are by address, not by name: the table must follow the names.
        let names = ["instance-c", "instance-a", "instance-b"];
        let t = Maglev::new(&names).unwrap();
        assert_eq!(t.len(), 3001);
        let first: Vec<&str> = (0..12).map(|s| names[t.owner(s)]).collect();
        let [a, b, c] = ["instance-a", "instance-b", "instance-c"];
        assert_eq!(first, [a, a, c, a, b, b, b, c, b, a, a, a]);
        let mut counts = [0; 3];
        for s in 0..t.len() {
            counts[t.owner(s)] += 1;
        }
        // c, a, b: 1000, 1001, 1000 slots.
        assert_eq!(counts, [1000, 1001, 1000]);
        assert_eq!(t.slot(b"tenant-1"), 462);
        let owners: Vec<&str> = TENANTS.iter().map(|k| owner(&t, &names, k)).collect();
        assert_eq!(owners, [b, b, a, c, a, b, c, c]);
        // The order retries take from tenant-1's slot.
        let mut order: Vec<&str> = Vec::new();
        for i in t.from(t.slot(b"tenant-1")) {
            if !order.contains(&names[i]) {
                order.push(names[i]);
            }
        }
        assert_eq!(order, [b, c, a]);

        // instance-b leaves: only its tenants move (GoRouter's table gave the same).
        let names = ["instance-c", "instance-a"];
        let t = Maglev::new(&names).unwrap();
        let owners: Vec<&str> = TENANTS.iter().map(|k| owner(&t, &names, k)).collect();
        assert_eq!(owners, [c, c, a, c, a, a, c, c]);
    }

    #[test]
    fn every_slot_is_claimed_evenly_and_a_leaving_instance_moves_little_else() {
        let names: Vec<String> = (0..30).map(|i| format!("guid-{i:04}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = Maglev::new(&refs).unwrap();
        let mut counts = vec![0usize; 30];
        for s in 0..t.len() {
            counts[t.owner(s)] += 1;
        }
        // The instances take turns claiming slots: each has ⌊M/N⌋ or ⌈M/N⌉.
        assert!(counts.iter().all(|c| (100..=101).contains(c)), "{counts:?}");
        // One instance leaves: the others keep nearly all their slots (61 of 2,901 move; a
        // table rebuilt by modulo would move most).
        let fewer: Vec<&str> = refs.iter().copied().filter(|n| *n != "guid-0007").collect();
        let u = Maglev::new(&fewer).unwrap();
        let moved = (0..t.len())
            .filter(|s| refs[t.owner(*s)] != "guid-0007")
            .filter(|s| refs[t.owner(*s)] != fewer[u.owner(*s)])
            .count();
        assert!(
            moved < t.len() / 30,
            "{moved} slots of staying instances moved"
        );
        // The table follows names, not positions or the order of registration.
        let mut shuffled = refs.clone();
        shuffled.reverse();
        let r = Maglev::new(&shuffled).unwrap();
        assert!((0..t.len()).all(|s| refs[t.owner(s)] == shuffled[r.owner(s)]));
    }

    #[test]
    fn duplicates_one_instance_and_small_tables() {
        assert!(Maglev::new(&[]).is_none());
        let t = Maglev::new(&["only"]).unwrap();
        assert!((0..t.len()).all(|s| t.owner(s) == 0));
        // The same name twice: the first position owns every slot of that name.
        let t = Maglev::new(&["x", "y", "x"]).unwrap();
        assert!((0..t.len()).all(|s| t.owner(s) != 2));
        assert!((0..t.len()).any(|s| t.owner(s) == 0) && (0..t.len()).any(|s| t.owner(s) == 1));
        // More instances than slots: the table still fills, with the first M names.
        let names: Vec<String> = (0..20).map(|i| format!("n{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = Maglev::with_size(&refs, 7).unwrap();
        let mut owners: Vec<usize> = (0..7).map(|s| t.owner(s)).collect();
        owners.sort();
        assert_eq!(owners, (0..7).collect::<Vec<_>>());
        // `from` wraps around once.
        let t = Maglev::new(&["x", "y"]).unwrap();
        assert_eq!(t.from(3000).count(), 3001);
        assert_eq!(t.from(3000).next(), Some(t.owner(3000)));
        assert_eq!(t.from(3000).nth(1), Some(t.owner(0)));
    }
}
