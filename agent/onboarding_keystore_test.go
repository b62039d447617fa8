package agent_test

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	tpm "github.com/google/go-tpm/tpm2"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// The X.509 onboarding key is in a TPM (swtpm behind a relay that plays
// the device going away), the operational key in a file. The TPM stops
// answering exactly when DPS's TLS handshake needs the onboarding key's
// signature: the signer's error reaches the agent only as text through the
// TLS stack, yet status must say key-store-unavailable naming the TPM (the
// user must look at the TPM, not at DPS), not provisioning-failed; and once
// the TPM is back the agent provisions without a restart. Over MQTT and
// over HTTPS (DPS's REST API).
func TestOnboardingKeyGoneDuringDPSHandshake(t *testing.T) {
	for _, transport := range []string{"mqtt", "https"} {
		t.Run(transport, func(t *testing.T) {
			sw := testenv.StartSWTPM(t)
			relay := startTPMRelay(t, sw.Sock)
			az := azsimtest.Start(t, azsim.Config{})
			dir := t.TempDir()
			d := newDevice(t, az, devOpts{regID: "gw-onb-gone-" + transport,
				onKey: "tpm2:socket=" + relay.Sock + ";blob=" + filepath.Join(dir, "onboarding.tpmkey")})
			if transport == "https" {
				overHTTPS(d)
			}
			gone := make(chan struct{})
			relay.arm(func(cc tpm.TPMCC, n int) bool {
				if cc != tpm.TPMCCSign || n != 1 {
					return false
				}
				relay.down()
				close(gone)
				return true // the signature never comes back
			})
			r := d.start()
			select {
			case <-gone:
			case <-time.After(30 * time.Second):
				t.Fatalf("the agent never signed with the onboarding key (commands %s)", relay.sequence())
			}
			testenv.Eventually(t, 30*time.Second, "key-store-unavailable naming the TPM", func() bool {
				st := d.status()
				return strings.Contains(st.Conditions[agent.CondKeyStoreUnavailable], relay.Sock)
			})
			st := d.status()
			msg := st.Conditions[agent.CondKeyStoreUnavailable]
			for _, want := range []string{"onboarding key", relay.Sock + " stopped answering", "DPS"} {
				if !strings.Contains(msg, want) {
					t.Errorf("the condition does not say %q: %s", want, msg)
				}
			}
			if reason, ok := st.Conditions[agent.CondProvisioningFailed]; ok {
				t.Errorf("a vanished TPM is reported as %s: %s", agent.CondProvisioningFailed, reason)
			}
			relay.arm(nil)
			relay.up()
			testenv.Eventually(t, 60*time.Second, "provisioned and connected once the TPM is back, no conditions left", func() bool {
				st := d.status()
				return st.State == "connected" && len(st.Conditions) == 0
			})
			if !strings.Contains(r.log.String(), "provisioning failed") {
				t.Fatal("the provisioning never failed: the test tested nothing")
			}
		})
	}
}
