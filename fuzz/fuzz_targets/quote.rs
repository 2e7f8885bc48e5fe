//! Quote parsing and verification (dcap-qvl) on any bytes, against the real collateral of the
//! shared test vector at its time: never a panic, and whatever verifies measures exactly what
//! the genuine quote measures (only its signed content can pass).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const COLLATERAL: &[u8] = include_bytes!("../../../shared/vectors/tdx/tdx_quote_collateral.json");
const GENUINE: &[u8] = include_bytes!("../../../shared/vectors/tdx/tdx_quote");
/// When the vector's collateral is valid.
const AT: u64 = 1_750_332_747;

fn collateral() -> &'static cocoon_attest::Collateral {
    static C: OnceLock<cocoon_attest::Collateral> = OnceLock::new();
    C.get_or_init(|| cocoon_attest::parse_collateral(COLLATERAL).expect("vector collateral parses"))
}

fuzz_target!(|data: &[u8]| {
    let measured = cocoon_attest::read_measurements(data);
    if cocoon_attest::verify_quote(data, collateral(), AT).is_ok() {
        let genuine = cocoon_attest::read_measurements(GENUINE).expect("the vector parses");
        assert_eq!(
            measured.ok().map(|(_, m)| m),
            Some(genuine.1),
            "a quote measuring something else verified"
        );
    }
});
