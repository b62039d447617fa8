package main

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
	"github.com/gwagent/gwagent/provisioning"
)

// gwagent onboard tpm prints what DPS's individual enrollment needs, taken
// from the TPM itself.
func TestOnboardTPM(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	ks, err := tpm2.Open(context.Background(), keystore.MustParse("tpm2:socket="+sw.Sock+";blob=/unused"))
	if err != nil {
		t.Fatal(err)
	}
	ek, _, err := ks.(*tpm2.Store).DPSPublics(context.Background())
	ks.Close()
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.StdEncoding.EncodeToString(ek)
	ekOut := filepath.Join(t.TempDir(), "ek.b64")

	out, _, err := gw(t, "onboard", "tpm", "--tpm", "tpm2:socket="+sw.Sock, "--ek-out", ekOut)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"registration_id: " + provisioning.TPMRegistrationID(ek) + "\n", "endorsement_key: " + b64 + "\n", "ek_certificate: none"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if b, _ := os.ReadFile(ekOut); strings.TrimSpace(string(b)) != b64 {
		t.Errorf("--ek-out wrote %q", b)
	}

	t.Run("ok/config names the registration id", func(t *testing.T) {
		dir := t.TempDir()
		cfg := filepath.Join(dir, "gw.toml")
		os.WriteFile(cfg, []byte(`trust_bundle = "/nonexistent.pem"
state_dir = "`+dir+`"
[identity]
id_scope = "0ne00AZSIM0"
registration_id = "line-7-gw-42"
[onboarding]
kind = "tpm"
tpm = "tpm2:socket=`+sw.Sock+`"
[operational]
key = "tpm2:socket=`+sw.Sock+`;blob=`+dir+`/op.tpmkey"
`), 0o600)
		out, _, err := gw(t, "onboard", "tpm", "--config", cfg)
		if err != nil || !strings.Contains(out, "registration_id: line-7-gw-42\n") || !strings.Contains(out, b64) {
			t.Fatalf("%v\n%s", err, out)
		}
	})
	t.Run("fail/no TPM", func(t *testing.T) {
		_, _, err := gw(t, "onboard", "tpm", "--tpm", "tpm2:socket=/nonexistent/tpm.sock")
		if err == nil || !strings.Contains(err.Error(), "no TPM at /nonexistent/tpm.sock") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("fail/bad tpm URI", func(t *testing.T) {
		_, _, err := gw(t, "onboard", "tpm", "--tpm", "tpm2:handle=0x81000001")
		if err == nil || !strings.Contains(err.Error(), "tpm2:device=/dev/tpmrm0") {
			t.Fatalf("got %v", err)
		}
	})
}
