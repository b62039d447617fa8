package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const minimal = `
trust_bundle = "roots.pem"
[identity]
id_scope = "0ne00AZSIM"
registration_id = "gw-1"
[onboarding]
kind = "x509"
key = "file:/s/onb.key"
chain = "onb.pem"
[operational]
key = "file:/s/op.key"
`

func TestConfig(t *testing.T) {
	tests := []struct {
		name string
		text string
		want []string // substrings of the error; nil = valid
	}{
		{"ok/minimal", minimal, nil},
		{"ok/symmetric", strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"symmetric_key\"\nsymmetric_key_file = \"k\"\ngroup_key = true", 1), nil},
		{"fail/unknown-key-with-line", minimal + "[identity2]\nfoo = 1\n", []string{"cfg.toml:12", `unknown key "identity2"`}},
		{"fail/typo-in-section", strings.Replace(minimal, "id_scope", "idscope", 1), []string{"cfg.toml:4", `"identity.idscope"`}},
		{"fail/syntax", minimal + "state_dir = \n", []string{"cfg.toml:12"}},
		{"fail/missing-required", "[identity]\n", []string{"trust_bundle is required", "id_scope is required", "registration_id", "kind is required", "[operational] key"}},
		{"fail/bad-kind", strings.Replace(minimal, `kind = "x509"`, `kind = "tpm2"`, 1), []string{`kind "tpm2"`, `"tpm"`}},
		{"ok/tpm attestation, no registration id", strings.Replace(strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"tpm\"\ntpm = \"tpm2:socket=/run/swtpm.sock\"", 1), "registration_id = \"gw-1\"\n", "", 1), nil},
		{"fail/tpm with x509 leftovers", strings.Replace(minimal, `kind = "x509"`, `kind = "tpm"`, 1), []string{"not used with kind = \"tpm\""}},
		{"fail/tpm over mqtt", strings.Replace(strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"tpm\"", 1), `registration_id = "gw-1"`, "registration_id = \"gw-1\"\ndps_transport = \"mqtt\"", 1), []string{"cannot carry TPM attestation"}},
		{"fail/bad tpm URI", strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"tpm\"\ntpm = \"tpm2:handle=0x81000001\"", 1), []string{"[onboarding] tpm", "tpm2:device=/dev/tpmrm0"}},
		{"fail/bad transport", strings.Replace(minimal, `registration_id = "gw-1"`, "registration_id = \"gw-1\"\ndps_transport = \"amqp\"", 1), []string{`dps_transport "amqp"`}},
		{"fail/bad-key-uri", strings.Replace(minimal, "file:/s/op.key", "tpm2:handle=7", 1), []string{"[operational] key", "persistent handle"}},
		{"fail/same-keys", strings.Replace(minimal, "file:/s/op.key", "file:/s/onb.key", 1), []string{"must differ"}},
		{"fail/log-level", "log_level = \"loud\"\n" + minimal, []string{"log_level"}},
		{"fail/pin-not-echoed", strings.Replace(minimal, "file:/s/op.key", "pkcs11:token=gw?module-path=/m.so&pin-value=hunter2", 1), []string{"object="}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig("/etc/gw/cfg.toml", []byte(tc.text))
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted; want error with %q", tc.want)
			}
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("error does not wrap ErrConfig: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("PIN leaked: %v", err)
			}
			_ = c
		})
	}
}

func TestConfigDefaultsAndPaths(t *testing.T) {
	_, err := ParseConfig("/etc/gw/cfg.toml", []byte(minimal+"[identity.x]\n"))
	if err == nil {
		t.Fatal("accepted a sub-table that does not exist")
	}
	c, err := ParseConfig("/etc/gw/cfg.toml", []byte(strings.Replace(minimal, "[identity]", "[identity]\nprovisioning_timeout = \"90s\"", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if c.TrustBundle != "/etc/gw/roots.pem" || c.Onboarding.Chain != "/etc/gw/onb.pem" {
		t.Errorf("relative paths not resolved against the config dir: %q %q", c.TrustBundle, c.Onboarding.Chain)
	}
	if c.StateDir != "/var/lib/gwagent" || c.Identity.DPSEndpoint != "global.azure-devices-provisioning.net" ||
		c.Identity.APIVersion != "2025-07-01-preview" || c.Identity.ProvisioningTimeout.Duration != 90*time.Second {
		t.Errorf("defaults: %+v", c)
	}
	if _, err := ParseConfig("/c.toml", []byte(strings.Replace(minimal, "[identity]", "[identity]\nprovisioning_timeout = \"soon\"", 1))); err == nil || !strings.Contains(err.Error(), "not a duration") {
		t.Errorf("bad duration: %v", err)
	}
}

// The shipped example must load: it is what people copy.
func TestExampleConfigLoads(t *testing.T) {
	matches, _ := filepath.Glob("../configs/*.toml")
	if len(matches) == 0 {
		t.Fatal("no example configs found")
	}
	for _, m := range matches {
		raw, _ := os.ReadFile(m)
		if _, err := ParseConfig(m, raw); err != nil {
			t.Errorf("%s: %v", m, err)
		}
	}
}

// The shipped, commented example must stay a valid config.
func TestExampleConfig(t *testing.T) {
	cfg, err := LoadConfig("../configs/gwagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Renewal.Threshold != 0.8 || !cfg.Renewal.Rotate() || cfg.Renewal.Prefer != "hub" {
		t.Fatalf("renewal section: %+v", cfg.Renewal)
	}
}

func TestConfigTPMDefaults(t *testing.T) {
	text := strings.Replace(minimal, "kind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"", "kind = \"tpm\"", 1)
	c, err := ParseConfig("/etc/gw/cfg.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.Onboarding.TPM != "tpm2:device=/dev/tpmrm0" || c.Identity.DPSTransport != "https" {
		t.Fatalf("tpm %q, transport %q", c.Onboarding.TPM, c.Identity.DPSTransport)
	}
	c, err = ParseConfig("/etc/gw/cfg.toml", []byte(minimal))
	if err != nil || c.Identity.DPSTransport != "mqtt" {
		t.Fatalf("x509 default transport: %v %v", c, err)
	}
}

func TestNetworkConfigValidate(t *testing.T) {
	for _, tc := range []struct{ name, toml, err string }{
		{"ok/defaults", "", ""},
		{"ok/websocket with proxy", "transport = \"websocket\"\nproxy = \"http://u:pw-1@proxy:3128\"\nno_proxy = \"localhost\"", ""},
		{"fail/unknown transport", "transport = \"quic\"", `transport "quic"`},
		{"fail/https proxy, password kept out", "proxy = \"https://u:pw-1@proxy:3128\"", "not supported"},
		{"fail/port", "hub_websocket_port = 70000", "hub_websocket_port"},
		{"fail/reprobe too often", "mqtt_reprobe = \"1s\"", "mqtt_reprobe"},
		{"fail/unknown key", "proxy_url = \"x\"", "unknown key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := "trust_bundle = \"ca.pem\"\n[hub]\nhost = \"h\"\ndevice_id = \"d\"\nchain = \"c.pem\"\n[operational]\nkey = \"file:/k\"\n[network]\n" + tc.toml + "\n"
			_, err := ParseConfig("/etc/gwagent/gwagent.toml", []byte(raw))
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if strings.Contains(err.Error(), "pw-1") {
				t.Fatalf("error shows the proxy password: %v", err)
			}
		})
	}
}
