//go:build cgo && !nopkcs11

package pkcs11

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/keystoretest"
)

func TestConformance(t *testing.T) {
	h := testenv.StartSoftHSM(t, "gw", "1234")
	keystoretest.Run(t, keystoretest.Backend{
		Open: func(t *testing.T) keystore.KeyStore {
			s, err := Open(context.Background(), keystore.MustParse(h.URI("x")))
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
		KeyURI: func(t *testing.T, name string) *keystore.URI { return keystore.MustParse(h.URI(name)) },
	})
}

func TestNonExtractable(t *testing.T) {
	ctx := context.Background()
	h := testenv.StartSoftHSM(t, "gw", "1234")
	u := keystore.MustParse(h.URI("device-key"))
	ks, err := Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	k, err := ks.CreateKey(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	s := ks.(*Store)
	for _, c := range []struct {
		attr crypto11.AttributeType
		name string
		want byte
	}{{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE", 0}, {pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", 1}, {pkcs11.CKA_TOKEN, "CKA_TOKEN", 1}} {
		v, err := s.attribute(k, c.attr)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if len(v) != 1 || v[0] != c.want {
			t.Errorf("fail/%s = %v, want %d", c.name, v, c.want)
		}
	}
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	h := testenv.StartSoftHSM(t, "gw", "1234")
	wrongPIN := t.TempDir() + "/pin"
	os.WriteFile(wrongPIN, []byte("9999"), 0o600)
	cases := []struct {
		name, uri string
		want      error
	}{
		{"fail/wrong PIN", strings.Replace(h.URI("k"), h.PINFile, wrongPIN, 1), keystore.ErrBadPIN},
		{"fail/wrong PIN value is redacted", "pkcs11:token=gw;object=k?module-path=" + h.Module + "&pin-value=s3cr3t-9999", keystore.ErrBadPIN},
		{"fail/absent token", strings.Replace(h.URI("k"), "token=gw", "token=nope", 1), keystore.ErrTokenAbsent},
		{"fail/missing module", strings.Replace(h.URI("k"), h.Module, "/usr/lib/no-such-pkcs11.so", 1), keystore.ErrDeviceAbsent},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(ctx, keystore.MustParse(c.uri))
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if strings.Contains(err.Error(), "s3cr3t") || strings.Contains(err.Error(), "9999") {
				t.Fatalf("the error leaks the PIN: %v", err)
			}
		})
	}
}

// TestOpenWhileAnotherSessionDeletes: one session deletes a key (the agent
// removing its old key after a renewal) while another opens it (gwagent
// check, or a test, looking). An open racing the delete finds the key or
// does not; it never fails with the token's "object handle invalid" from
// between finding the object and reading its attributes. Creating the key
// again is kept apart from the lookups: SoftHSM2 sometimes fails a key
// generation that overlaps another session's search (CKR_GENERAL_ERROR),
// which is not what this test is about.
func TestOpenWhileAnotherSessionDeletes(t *testing.T) {
	ctx := context.Background()
	h := testenv.StartSoftHSM(t, "gw", "1234")
	u := keystore.MustParse(h.URI("operational"))
	open := func() *Store {
		ks, err := Open(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ks.Close() })
		return ks.(*Store)
	}
	agent, looker := open(), open()
	found, missing := 0, 0
	for i := range 100 {
		if _, err := agent.CreateKey(ctx, u); err != nil {
			t.Fatalf("create: %v", err)
		}
		stop, done := make(chan struct{}), make(chan error, 1)
		go func() {
			for {
				_, err := looker.Signer(ctx, u)
				switch {
				case err == nil:
					found++
				case errors.Is(err, keystore.ErrKeyNotFound):
					missing++
				default:
					done <- err
					return
				}
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
			}
		}()
		time.Sleep(time.Duration(i%5) * 200 * time.Microsecond)
		delErr := agent.DeleteKey(ctx, u)
		close(stop)
		if err := <-done; err != nil {
			t.Fatalf("round %d: opening a key another session is deleting: %v", i, err)
		}
		if delErr != nil {
			t.Fatalf("delete: %v", delErr)
		}
	}
	t.Logf("the looker found the key %d times and missed it %d times", found, missing)
	if found == 0 || missing == 0 {
		t.Error("the lookups never overlapped the deletes")
	}
}
