//! A set of host CPUs as a bit mask: what the ledgers count with. Placement tests
//! every host for every VM, so membership and counting must cost a few
//! instructions, not a tree walk ([`drover_topology::CpuSet`] is for lists users read).

use drover_topology::CpuSet;

/// Host CPUs, one bit each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuMask(Vec<u64>);

impl CpuMask {
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.get((cpu / 64) as usize).is_some_and(|w| w & (1 << (cpu % 64)) != 0)
    }

    pub fn insert(&mut self, cpu: u32) {
        let word = (cpu / 64) as usize;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (cpu % 64);
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Adds every CPU of `other`.
    pub fn add(&mut self, other: &CpuMask) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    /// Removes every CPU of `other`.
    pub fn remove(&mut self, other: &CpuMask) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= !b;
        }
    }

    /// Whether any CPU is in both.
    pub fn intersects(&self, other: &CpuMask) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }

    /// The CPUs of `self` that are not in `other`, counted.
    pub fn count_without(&self, other: &CpuMask) -> usize {
        self.0.iter().enumerate().map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as usize).sum()
    }

    /// The CPUs, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| (0..64u32).filter(move |b| w & (1 << b) != 0).map(move |b| i as u32 * 64 + b))
    }

    pub fn to_cpuset(&self) -> CpuSet {
        self.iter().collect()
    }
}

impl From<&CpuSet> for CpuMask {
    fn from(set: &CpuSet) -> Self {
        let mut mask = CpuMask::default();
        for cpu in set.iter() {
            mask.insert(cpu);
        }
        mask
    }
}

impl FromIterator<u32> for CpuMask {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut mask = CpuMask::default();
        for cpu in iter {
            mask.insert(cpu);
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut a: CpuMask = [0, 3, 64, 130].into_iter().collect();
        let b: CpuMask = [3, 130].into_iter().collect();
        assert!(a.contains(64) && !a.contains(65) && !a.contains(10_000));
        assert_eq!(a.len(), 4);
        assert_eq!(a.count_without(&b), 2);
        assert!(a.intersects(&b));
        a.remove(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 64]);
        a.add(&b);
        assert_eq!(a.to_cpuset().to_string(), "0,3,64,130");
    }
}
