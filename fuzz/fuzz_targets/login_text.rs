//! Hostile login text never panics the negotiator, whatever stage it claims.
#![no_main]
use iscsi_proto::login::{
    Authentication, ChallengeSource, ChapAccount, LoginNegotiator, LoginPolicy, LoginStatus, TargetAdmission,
    TargetLimits,
};
use iscsi_proto::pdu::Login;
use libfuzzer_sys::fuzz_target;

struct Policy;
impl LoginPolicy for Policy {
    fn admit(&self, _i: &str, t: &str) -> Result<TargetAdmission, LoginStatus> {
        if t.len() % 2 == 0 {
            return Err(LoginStatus::NOT_FOUND);
        }
        let acct = ChapAccount { user: "u".into(), secret: "secretsecret".into(), mutual: Some(("t".into(), "tsecrettsecret".into())) };
        Ok(TargetAdmission { auth: Authentication::Chap(vec![acct]), portal_group_tag: 1, alias: None })
    }
    fn admit_discovery(&self, _i: &str) -> Result<TargetAdmission, LoginStatus> {
        Ok(TargetAdmission { auth: Authentication::None, portal_group_tag: 1, alias: None })
    }
}
struct Fixed;
impl ChallengeSource for Fixed {
    fn fill(&mut self, buf: &mut [u8]) {
        buf.fill(3);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut n = LoginNegotiator::new(TargetLimits::default());
    for chunk in data.split(|b| *b == 0xff).take(8) {
        let (flags, text) = chunk.split_first().unwrap_or((&0, &[]));
        let req = Login {
            transit: flags & 0x80 != 0,
            continue_bit: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            ..Default::default()
        };
        let r = n.step(&req, text, &Policy, &mut Fixed);
        if r.failed() {
            break;
        }
    }
});
