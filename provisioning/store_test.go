package provisioning

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestMain doubles as the crash child: with GWAGENT_TEST_CRASH_STEP set, the
// test binary saves an identity and SIGKILLs itself at that step.
func TestMain(m *testing.M) {
	if step := os.Getenv("GWAGENT_TEST_CRASH_STEP"); step != "" {
		crashChild(step, os.Getenv("GWAGENT_TEST_CRASH_DIR"))
		os.Exit(3) // only reached if the step never came
	}
	os.Exit(m.Run())
}

func crashChild(step, dir string) {
	s, err := OpenStore(dir)
	if err != nil {
		panic(err)
	}
	s.crashAt = func(at string) {
		if at == step {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "new-chain.pem"))
	var chain []*x509.Certificate
	for rest := raw; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, _ := x509.ParseCertificate(b.Bytes)
		chain = append(chain, c)
	}
	if _, err := s.Save(&Identity{KeyURI: "file:/new.key", DeviceID: "dev-1", Via: "dps"}, chain); err != nil {
		panic(err)
	}
	os.Exit(0)
}

func TestStoreSaveLoad(t *testing.T) {
	ca := newTestCA(t, "azsim")
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	chain := ca.issue(t, &key.PublicKey, "dev-1", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Current(); !errors.Is(err, ErrNotProvisioned) {
		t.Fatalf("empty store: got %v, want ErrNotProvisioned", err)
	}
	saved, err := s.Save(&Identity{KeyURI: "file:/k", DeviceID: "dev-1", AssignedHub: "hub:8884", Via: "dps"}, chain)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Current()
	if err != nil {
		t.Fatal(err)
	}
	if got.Generation != saved.Generation || got.AssignedHub != "hub:8884" || len(got.Chain) != 3 || !got.Leaf().Equal(chain[0]) {
		t.Fatalf("loaded %+v", got)
	}
	if got.Serial != FormatSerial(chain[0].SerialNumber) || !got.NotAfter.Equal(chain[0].NotAfter) {
		t.Fatalf("serial/notAfter not recorded: %+v", got)
	}
	st, _ := os.Stat(filepath.Join(s.Dir(), got.Generation, identityFile))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("identity.json mode %04o, want 0600 (it holds the key URI)", st.Mode().Perm())
	}
	// Stage beside it: current untouched until Commit; Discard rolls back.
	if _, err := s.Stage(&Identity{KeyURI: "file:/k2", DeviceID: "dev-1"}, chain); err != nil {
		t.Fatal(err)
	}
	if cur, _ := s.Current(); cur.KeyURI != "file:/k" {
		t.Fatal("staging changed the current identity")
	}
	if err := s.Discard(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Next(); !errors.Is(err, ErrNotProvisioned) {
		t.Fatal("next still staged after Discard")
	}
	if gens, _ := s.gens(); len(gens) != 1 {
		t.Fatalf("generations after discard: %v", gens)
	}
}

// TestStoreCrash kills a process at every step of a save and checks that the
// store then holds the old identity or the new one, complete, never a mix.
func TestStoreCrash(t *testing.T) {
	ca := newTestCA(t, "azsim")
	oldKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	newKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	now := time.Now()
	oldChain := ca.issue(t, &oldKey.PublicKey, "dev-1", now.Add(-time.Minute), now.Add(time.Hour))
	newChain := ca.issue(t, &newKey.PublicKey, "dev-1", now.Add(-time.Minute), now.Add(2*time.Hour))

	for _, tc := range []struct {
		step    string
		wantNew bool
	}{
		{"chain-written", false},
		{"identity-written", false},
		{"staged", false},
		{"committed", true},
	} {
		t.Run("ok/kill-after-"+tc.step, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := OpenStore(dir)
			if _, err := s.Save(&Identity{KeyURI: "file:/old.key", DeviceID: "dev-1", Via: "dps"}, oldChain); err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			for _, c := range newChain {
				pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
			}
			os.WriteFile(filepath.Join(dir, "new-chain.pem"), buf.Bytes(), 0o600)

			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "GWAGENT_TEST_CRASH_STEP="+tc.step, "GWAGENT_TEST_CRASH_DIR="+dir)
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child was not killed at %s: %v", tc.step, err)
			}

			s, _ = OpenStore(dir)
			cur, err := s.Current()
			if err != nil {
				t.Fatalf("after crash: %v", err)
			}
			wantKey, wantLeaf := "file:/old.key", oldChain[0]
			if tc.wantNew {
				wantKey, wantLeaf = "file:/new.key", newChain[0]
			}
			if cur.KeyURI != wantKey || !cur.Leaf().Equal(wantLeaf) || cur.Serial != FormatSerial(wantLeaf.SerialNumber) {
				t.Fatalf("after kill at %s: key %s serial %s; want %s with its own certificate", tc.step, cur.KeyURI, cur.Serial, wantKey)
			}
			// The leftovers are pruned and a fresh save works.
			if err := s.Discard(); err != nil {
				t.Fatal(err)
			}
			if gens, _ := s.gens(); len(gens) != 1 {
				t.Fatalf("generations after prune: %v", gens)
			}
			if _, err := s.Save(&Identity{KeyURI: "file:/new.key", DeviceID: "dev-1"}, newChain); err != nil {
				t.Fatal(err)
			}
		})
	}
}
