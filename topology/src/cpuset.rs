//! Sets of host CPUs in the Linux CPU-list syntax (`0-3,8`).

use crate::Error;

/// A set of host CPUs, parsed from the Linux CPU-list syntax (`0-3,8`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuSet(std::collections::BTreeSet<u32>);

impl CpuSet {
    /// Parses a CPU list such as `0-3,8,10-11`. The empty string is the empty set.
    pub fn parse(list: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::CpuList { list: list.to_string(), why: why.to_string() };
        let mut cpus = std::collections::BTreeSet::new();
        if list.trim().is_empty() {
            return Ok(Self(cpus));
        }
        for part in list.trim().split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let first: u32 =
                first.trim().parse().map_err(|_| bad(&format!("`{part}` is not a CPU number or range")))?;
            let last: u32 = last.trim().parse().map_err(|_| bad(&format!("`{part}` is not a CPU number or range")))?;
            if first > last {
                return Err(bad(&format!("range `{part}` runs backwards")));
            }
            if last - first >= 65_536 {
                return Err(bad(&format!("range `{part}` is larger than any host")));
            }
            cpus.extend(first..=last);
        }
        Ok(Self(cpus))
    }

    /// How many CPUs the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl std::fmt::Display for CpuSet {
    /// Writes the canonical CPU list, folding runs into ranges (`0-3,8`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first_range = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end += 1;
                cpus.next();
            }
            if !first_range {
                f.write_str(",")?;
            }
            first_range = false;
            if start == end { write!(f, "{start}")? } else { write!(f, "{start}-{end}")? }
        }
        Ok(())
    }
}

/// A CPU set travels as its CPU list (`"0-3,8"`), as everywhere else in Drover.
impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = String::deserialize(deserializer)?;
        CpuSet::parse(&list).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_parses_ranges_and_singles() {
        let set = CpuSet::parse("0-3,8,10-11").unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(set.len(), 7);
        assert_eq!(set.to_string(), "0-3,8,10-11");
    }

    #[test]
    fn cpu_list_display_folds_runs() {
        let set: CpuSet = [5, 1, 2, 3, 7].into_iter().collect();
        assert_eq!(set.to_string(), "1-3,5,7");
        assert_eq!(CpuSet::default().to_string(), "");
    }

    #[test]
    fn cpu_list_rejects_malformed_input() {
        for bad in ["a", "1-", "-1", "3-1", "1,,2", "0-70000"] {
            let err = CpuSet::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "error for {bad:?} should quote the input: {err}");
        }
    }
}
