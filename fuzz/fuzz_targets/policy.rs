//! Fuzzes the visitor policy's CIDR parser (entries come from connectors'
//! claims). An entry either fails or parses to a block whose text form
//! parses back to the same block and which contains its own address.
#![no_main]

use std::net::IpAddr;

use kitepipe_proto::policy::{Cidr, VisitorPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cidr) = text.parse::<Cidr>() {
        let shown = cidr.to_string();
        assert_eq!(shown.parse::<Cidr>(), Ok(cidr), "{text:?} -> {shown}");
        let (addr, _) = shown.split_once('/').unwrap();
        let addr: IpAddr = addr.parse().unwrap();
        assert!(cidr.contains(addr), "{shown}");
    }
    let entries: Vec<&str> = text.split(',').collect();
    if let Ok(policy) = VisitorPolicy::parse(&entries, &[]) {
        assert!(policy.allow().len() <= kitepipe_proto::policy::MAX_POLICY_ENTRIES);
    }
});
