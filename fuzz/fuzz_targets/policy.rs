//! Policy text → validated `Policy` → `CompiledPolicy` (what `policy check`,
//! `policy apply` and daemon start do with a file). Neither step may panic,
//! whatever the text; errors must render.
#![no_main]

use agent_guard::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_str(text, "fuzz.toml") {
        Ok(p) => p,
        Err(e) => {
            // The message carries a line:col computed from a byte offset.
            let _ = e.to_string();
            let _ = e.location();
            return;
        }
    };
    // Lookups the daemon does with the names it was given.
    for agent in &policy.agents {
        let _ = agent.effective_mode(&policy);
        assert!(policy.agent(&agent.tenant, &agent.name).is_some());
    }
    match policy.compile() {
        Ok(compiled) => {
            for agent in &policy.agents {
                let _ = compiled.agent_index(&agent.tenant, &agent.name);
                let _ = compiled.tenant_id(&agent.tenant);
            }
            for tool in &policy.tools {
                if let Some(id) = compiled.tool_id(&tool.name) {
                    assert_eq!(compiled.tool_name(id), Some(tool.name.as_str()));
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
