//! `VniMap`: a peer's state per VNI (what it subscribed, what it
//! announced), small for the peer a fleet is made of.
//!
//! Owns: the two forms of such a map. A hypervisor subscribes to and
//! announces in a few VNIs; a `BTreeMap` or `HashMap` allocated a node or
//! table of ~150 bytes for the first entry, twice per peer: ~5 MiB of a
//! 19,000-peer fleet (issue #28). Up to `FEW_VNIS` entries sit in one
//! sorted vector (the first inline), beyond that in a `BTreeMap`, so a
//! peer with 100,000 VNIs costs a B-tree's log n per look-up, never a
//! vector's n per insert.
//!
//! Must never: know what the values mean, or iterate out of VNI order.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use metalbond_wire::types::Vni;

/// Entries held in the vector form at most.
const FEW_VNIS: usize = 8;

/// A map by VNI, ordered by VNI; see the module doc.
#[derive(Debug)]
pub(crate) struct VniMap<V> {
    /// The entries, in one of two forms.
    form: Form<V>,
}

/// The two forms of a `VniMap`.
#[derive(Debug)]
enum Form<V> {
    /// Up to `FEW_VNIS` entries sorted by VNI, the first one inline.
    Few(SmallVec<[(Vni, V); 1]>),
    /// More.
    Many(BTreeMap<Vni, V>),
}

impl<V> Default for VniMap<V> {
    fn default() -> VniMap<V> {
        VniMap {
            form: Form::Few(SmallVec::new()),
        }
    }
}

impl<V> VniMap<V> {
    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        match &self.form {
            Form::Few(v) => v.len(),
            Form::Many(m) => m.len(),
        }
    }

    /// The value of `vni`.
    pub(crate) fn get(&self, vni: &Vni) -> Option<&V> {
        match &self.form {
            Form::Few(v) => v
                .binary_search_by_key(vni, |(k, _)| *k)
                .ok()
                .map(|i| &v[i].1),
            Form::Many(m) => m.get(vni),
        }
    }

    /// The value of `vni`, to change.
    pub(crate) fn get_mut(&mut self, vni: &Vni) -> Option<&mut V> {
        match &mut self.form {
            Form::Few(v) => match v.binary_search_by_key(vni, |(k, _)| *k) {
                Ok(i) => Some(&mut v[i].1),
                Err(_) => None,
            },
            Form::Many(m) => m.get_mut(vni),
        }
    }

    /// Is `vni` in the map?
    pub(crate) fn contains_key(&self, vni: &Vni) -> bool {
        self.get(vni).is_some()
    }

    /// Sets the value of `vni`; returns the one it replaces.
    pub(crate) fn insert(&mut self, vni: Vni, value: V) -> Option<V> {
        match &mut self.form {
            Form::Few(v) => match v.binary_search_by_key(&vni, |(k, _)| *k) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, value)),
                Err(i) if v.len() < FEW_VNIS => {
                    v.insert(i, (vni, value));
                    None
                }
                Err(_) => {
                    let mut m: BTreeMap<Vni, V> = v.drain(..).collect();
                    m.insert(vni, value);
                    self.form = Form::Many(m);
                    None
                }
            },
            Form::Many(m) => m.insert(vni, value),
        }
    }

    /// The value of `vni`, inserted as the default first if missing.
    pub(crate) fn get_or_default(&mut self, vni: Vni) -> &mut V
    where
        V: Default,
    {
        if !self.contains_key(&vni) {
            self.insert(vni, V::default());
        }
        match &mut self.form {
            Form::Few(v) => {
                let i = v
                    .binary_search_by_key(&vni, |(k, _)| *k)
                    .unwrap_or_else(|_| unreachable!("inserted above"));
                &mut v[i].1
            }
            Form::Many(m) => m.entry(vni).or_default(),
        }
    }

    /// Removes `vni`; returns its value.
    pub(crate) fn remove(&mut self, vni: &Vni) -> Option<V> {
        match &mut self.form {
            Form::Few(v) => {
                let i = v.binary_search_by_key(vni, |(k, _)| *k).ok()?;
                let (_, value) = v.remove(i);
                if v.is_empty() {
                    // Back to no allocation at all.
                    *v = SmallVec::new();
                }
                Some(value)
            }
            Form::Many(m) => m.remove(vni),
        }
    }

    /// The VNIs, in order.
    pub(crate) fn keys(&self) -> Box<dyn Iterator<Item = Vni> + '_> {
        match &self.form {
            Form::Few(v) => Box::new(v.iter().map(|(k, _)| *k)),
            Form::Many(m) => Box::new(m.keys().copied()),
        }
    }

    /// The entries in VNI order, values to change.
    pub(crate) fn iter_mut(&mut self) -> Box<dyn Iterator<Item = (Vni, &mut V)> + '_> {
        match &mut self.form {
            Form::Few(v) => Box::new(v.iter_mut().map(|(k, value)| (*k, value))),
            Form::Many(m) => Box::new(m.iter_mut().map(|(k, value)| (*k, value))),
        }
    }

    /// Keeps the entries for which `keep` holds.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(Vni, &mut V) -> bool) {
        match &mut self.form {
            Form::Few(v) => v.retain(|(k, value)| keep(*k, value)),
            Form::Many(m) => m.retain(|k, value| keep(*k, value)),
        }
    }
}

impl<V: 'static> IntoIterator for VniMap<V> {
    type Item = (Vni, V);
    type IntoIter = Box<dyn Iterator<Item = (Vni, V)>>;

    /// The entries in VNI order, by value.
    fn into_iter(self) -> Self::IntoIter {
        match self.form {
            Form::Few(v) => Box::new(v.into_iter()),
            Form::Many(m) => Box::new(m.into_iter()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vni(n: u32) -> Vni {
        Vni::new(n).unwrap()
    }

    #[test]
    fn holds_the_same_entries_in_order_in_both_forms() {
        let mut m: VniMap<u32> = VniMap::default();
        let order = [7u32, 3, 11, 1, 9, 5, 13, 2, 8, 4, 12, 6, 10];
        for (n, i) in order.iter().enumerate() {
            assert_eq!(m.insert(vni(*i), *i * 10), None);
            assert_eq!(m.insert(vni(*i), *i), Some(*i * 10), "replaced");
            assert_eq!(m.len(), n + 1);
            let few = matches!(m.form, Form::Few(_));
            assert_eq!(few, n < FEW_VNIS, "vector form up to FEW_VNIS");
            let keys: Vec<Vni> = m.keys().collect();
            let mut want: Vec<Vni> = order[..=n].iter().map(|i| vni(*i)).collect();
            want.sort();
            assert_eq!(keys, want, "ordered by VNI");
        }
        assert_eq!(m.get(&vni(9)), Some(&9));
        assert!(!m.contains_key(&vni(99)));
        *m.get_or_default(vni(99)) += 1;
        assert_eq!(m.get(&vni(99)), Some(&1));
        assert_eq!(m.remove(&vni(3)), Some(3));
        assert_eq!(m.remove(&vni(3)), None);
        m.retain(|k, _| k.get() % 2 == 0);
        let left: Vec<(Vni, u32)> = m.into_iter().collect();
        let want: Vec<(Vni, u32)> = [2u32, 4, 6, 8, 10, 12]
            .iter()
            .map(|i| (vni(*i), *i))
            .collect();
        assert_eq!(left, want);
    }

    #[test]
    fn a_few_entries_change_in_place_and_an_emptied_map_holds_nothing() {
        let mut m: VniMap<u32> = VniMap::default();
        *m.get_or_default(vni(5)) += 2;
        *m.get_or_default(vni(5)) += 3;
        *m.get_or_default(vni(1)) += 1;
        for (_, v) in m.iter_mut() {
            *v *= 10;
        }
        assert_eq!(m.get(&vni(5)), Some(&50));
        assert_eq!(m.get_mut(&vni(1)).map(|v| *v), Some(10));
        assert_eq!(m.remove(&vni(1)), Some(10));
        assert_eq!(m.remove(&vni(5)), Some(50));
        assert_eq!(m.len(), 0);
        let Form::Few(v) = &m.form else { panic!("few") };
        assert!(!v.spilled(), "nothing on the heap");
    }
}
