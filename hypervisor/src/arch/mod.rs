//! Architecture-specific set-up. Drover runs x86-64 guests.

pub mod x86_64;
