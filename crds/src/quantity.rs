//! Memory quantities as the API carries them (`512Mi`, `4Gi`, `1.5Gi`,
//! `1073741824`), in the whole MiB every part of Drover counts in.

/// A quantity that is not a whole number of MiB (the CRD's CEL refuses those in
/// VM specs; this names what was given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a whole number of MiB")]
pub struct NotWholeMib(pub String);

/// A Kubernetes memory quantity in whole MiB.
pub fn memory_mib(quantity: &str) -> Result<u64, NotWholeMib> {
    let bad = || NotWholeMib(quantity.to_string());
    let split = quantity.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    // Decimal quantities (1.5Gi) are exact in integers: scale by the fraction's digits.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 9 {
        return Err(bad());
    }
    let digits: u128 = format!("{whole}{frac}").parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = digits.checked_mul(multiplier).ok_or_else(bad)?;
    if bytes % scale != 0 || !(bytes / scale).is_multiple_of(1 << 20) {
        return Err(bad());
    }
    u64::try_from(bytes / scale / (1 << 20)).map_err(|_| bad())
}

/// MiB as a quantity users read: `4Gi` when whole GiB, else `1536Mi`.
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) { format!("{}Gi", mib / 1024) } else { format!("{mib}Mi") }
}

/// Host cores as `status.cpuUsage` carries them: millicores rounded to 50m
/// (`1500m`), so an idle or steady VM does not cause a status write per sample.
pub fn format_cores(cores: f64) -> String {
    format!("{}m", ((cores * 1000.0 / 50.0).round() * 50.0) as i64)
}

/// Host cores from a CPU quantity (`1500m`, `2`); `None` if it is not one.
pub fn cores(quantity: &str) -> Option<f64> {
    let q = quantity.trim();
    let value = match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => q.parse::<f64>().ok()?,
    };
    (value.is_finite() && value >= 0.0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_round_trip_in_millicores() {
        assert_eq!(format_cores(1.5), "1500m");
        assert_eq!(format_cores(0.4321), "450m");
        assert_eq!(cores(&format_cores(0.37)), Some(0.35));
        assert_eq!(cores("2"), Some(2.0));
        assert_eq!(cores("0m"), Some(0.0));
        assert_eq!(cores("-1"), None);
        assert_eq!(cores("lots"), None);
    }

    #[test]
    fn quantities_in_mib() {
        assert_eq!(memory_mib("512Mi"), Ok(512));
        assert_eq!(memory_mib("1.5Gi"), Ok(1536));
        assert_eq!(memory_mib("1073741824"), Ok(1024));
        assert_eq!(memory_mib("2G"), Err(NotWholeMib("2G".into())), "2e9 bytes is not whole MiB");
        assert!(memory_mib("1Ki").is_err() && memory_mib("").is_err() && memory_mib("4Xi").is_err());
        assert_eq!((format_mib(4096), format_mib(1536)), ("4Gi".to_string(), "1536Mi".to_string()));
    }
}
