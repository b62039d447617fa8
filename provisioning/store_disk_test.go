package provisioning_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/provisioning"
)

// On a full file system (a real tmpfs, out of blocks or out of inodes),
// staging fails with ENOSPC and leaves the store exactly as it was, and a
// generation staged before the disk filled up can still be committed: the
// commit renames "next" over "current" and needs no free block or inode.
func TestStoreDiskFull(t *testing.T) {
	for _, inodes := range []bool{false, true} {
		name := "out of blocks"
		if inodes {
			name = "out of inodes"
		}
		t.Run(name, func(t *testing.T) {
			chain := selfSigned(t, "dev-1")
			dir := filepath.Join(t.TempDir(), "state")
			testenv.Tmpfs(t, dir, "size=1m,nr_inodes=128,mode=0700")
			s, err := provisioning.OpenStore(dir)
			if err != nil {
				t.Fatal(err)
			}
			first, err := s.Save(&provisioning.Identity{KeyURI: "file:/a.key", DeviceID: "dev-1", Via: "dps"}, chain)
			if err != nil {
				t.Fatal(err)
			}
			staged, err := s.Stage(&provisioning.Identity{KeyURI: "file:/b.key", DeviceID: "dev-1", Via: "hub"}, chain)
			if err != nil {
				t.Fatal(err)
			}
			free := testenv.Fill(t, dir, inodes)

			if _, err := s.Stage(&provisioning.Identity{KeyURI: "file:/c.key", DeviceID: "dev-1", Via: "hub"}, chain); !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("staging on a full disk: %v, want ENOSPC", err)
			}
			if _, err := s.Save(&provisioning.Identity{KeyURI: "file:/c.key", DeviceID: "dev-1", Via: "dps"}, chain); !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("saving on a full disk: %v, want ENOSPC", err)
			}
			assertGens(t, s, first.Generation, staged.Generation)
			if cur, err := s.Current(); err != nil || cur.Generation != first.Generation {
				t.Fatalf("current %v (%v), want %s", cur, err, first.Generation)
			}
			if next, err := s.Next(); err != nil || next.Generation != staged.Generation {
				t.Fatalf("next %v (%v), want %s", next, err, staged.Generation)
			}

			prev, err := s.Commit()
			if err != nil {
				t.Fatalf("commit on a full disk: %v", err)
			}
			if prev == nil || prev.Generation != first.Generation {
				t.Fatalf("previous %v, want %s", prev, first.Generation)
			}
			if cur, err := s.Current(); err != nil || cur.Generation != staged.Generation || cur.KeyURI != "file:/b.key" {
				t.Fatalf("current after commit %v (%v), want %s", cur, err, staged.Generation)
			}
			if _, err := s.Next(); !errors.Is(err, provisioning.ErrNotProvisioned) {
				t.Fatalf("next after commit: %v, want none", err)
			}
			if err := s.Prune(); err != nil {
				t.Fatal(err)
			}
			assertGens(t, s, staged.Generation)

			free()
			if _, err := s.Save(&provisioning.Identity{KeyURI: "file:/a.key", DeviceID: "dev-1", Via: "dps"}, chain); err != nil {
				t.Fatalf("saving after space was freed: %v", err)
			}
		})
	}
}

// assertGens checks that the store holds exactly the generations want and
// no temp files.
func assertGens(t *testing.T, s *provisioning.Store, want ...string) {
	t.Helper()
	ents, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, e := range ents {
		switch {
		case e.Name() == "current" || e.Name() == "next":
		case e.IsDir() && strings.HasPrefix(e.Name(), "gen-"):
			got[e.Name()] = true
		default:
			t.Errorf("unexpected %s in the identity store", e.Name())
		}
	}
	if len(got) != len(want) {
		t.Fatalf("generations %v, want %v", got, want)
	}
	for _, g := range want {
		if !got[g] {
			t.Fatalf("generations %v, want %v", got, want)
		}
	}
}

func selfSigned(t *testing.T, cn string) []*x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return []*x509.Certificate{c}
}
