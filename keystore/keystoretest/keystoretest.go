// Package keystoretest is the conformance suite every key store backend
// passes: the same table of tests runs against swtpm, SoftHSM2 and files.
// Only tests import it.
package keystoretest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"sync"
	"testing"

	"github.com/gwagent/gwagent/keystore"
)

// Backend describes the store under test.
type Backend struct {
	// Open returns a new handle on the same underlying store (the same TPM,
	// token or directory) each time it is called; the suite closes it.
	// Reopening is how the suite checks that keys survive a restart.
	Open func(t *testing.T) keystore.KeyStore
	// KeyURI returns the URI of the key called name; distinct names must be
	// distinct key locations, none of which holds a key when the suite starts.
	KeyURI func(t *testing.T, name string) *keystore.URI
}

// Run runs the suite. Subtests are named ok/... and fail/... and share the
// store's state in order, like a device's life: create, reopen, a second key,
// delete.
func Run(t *testing.T, b Backend) {
	ctx := context.Background()
	a, bb, missing := b.KeyURI(t, "key-a"), b.KeyURI(t, "key-b"), b.KeyURI(t, "key-missing")

	var pubA *ecdsa.PublicKey
	t.Run("ok/create-p384-and-sign", func(t *testing.T) {
		ks := open(t, b)
		s, err := ks.CreateKey(ctx, a)
		if err != nil {
			t.Fatalf("CreateKey(%s): %v", a, err)
		}
		pubA = mustP384(t, s.Public())
		verify(t, s, crypto.SHA384)
		verify(t, s, crypto.SHA256)
		tls12ClientAuth(t, s)
	})
	if pubA == nil {
		t.Fatal("cannot continue without a first key")
	}
	t.Run("ok/reopen-after-restart", func(t *testing.T) {
		ks := open(t, b)
		s, err := ks.Signer(ctx, a)
		if err != nil {
			t.Fatalf("Signer(%s) after reopen: %v", a, err)
		}
		if !pubA.Equal(s.Public()) {
			t.Fatal("reopened key has a different public key")
		}
		verify(t, s, crypto.SHA384)
	})
	t.Run("fail/create-existing", func(t *testing.T) {
		ks := open(t, b)
		if _, err := ks.CreateKey(ctx, a); !errors.Is(err, keystore.ErrKeyExists) {
			t.Fatalf("CreateKey over an existing key: got %v, want ErrKeyExists", err)
		}
		s, err := ks.Signer(ctx, a)
		if err != nil || !pubA.Equal(s.Public()) {
			t.Fatalf("existing key damaged by refused CreateKey: %v", err)
		}
	})
	t.Run("fail/open-missing", func(t *testing.T) {
		ks := open(t, b)
		if _, err := ks.Signer(ctx, missing); !errors.Is(err, keystore.ErrKeyNotFound) {
			t.Fatalf("Signer(missing): got %v, want ErrKeyNotFound", err)
		}
	})
	t.Run("fail/bad-hash", func(t *testing.T) {
		ks := open(t, b)
		s, err := ks.Signer(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		d := sha1.Sum([]byte("x"))
		if _, err := s.Sign(rand.Reader, d[:], crypto.SHA1); !errors.Is(err, keystore.ErrUnsupportedHash) {
			t.Fatalf("SHA-1: got %v, want ErrUnsupportedHash", err)
		}
		short := make([]byte, 20)
		if _, err := s.Sign(rand.Reader, short, crypto.SHA384); !errors.Is(err, keystore.ErrUnsupportedHash) {
			t.Fatalf("20-byte digest as SHA-384: got %v, want ErrUnsupportedHash", err)
		}
	})
	t.Run("ok/two-keys-side-by-side", func(t *testing.T) {
		ks := open(t, b)
		sb, err := ks.CreateKey(ctx, bb)
		if err != nil {
			t.Fatalf("CreateKey(%s): %v", bb, err)
		}
		pubB := mustP384(t, sb.Public())
		if pubB.Equal(pubA) {
			t.Fatal("second key has the same public key as the first")
		}
		sa, err := ks.Signer(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		verify(t, sa, crypto.SHA384)
		verify(t, sb, crypto.SHA384)
	})
	t.Run("ok/concurrent-signing", func(t *testing.T) {
		ks := open(t, b)
		sa, err := ks.Signer(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		sb, err := ks.Signer(ctx, bb)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := 0; i < 8; i++ {
			s := sa
			if i%2 == 1 {
				s = sb
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				d := sha512.Sum384([]byte{byte(i)})
				sig, err := s.Sign(rand.Reader, d[:], crypto.SHA384)
				if err == nil && !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
					err = errors.New("signature does not verify")
				}
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("concurrent Sign: %v", err)
			}
		}
	})
	t.Run("ok/csr-sha384", func(t *testing.T) {
		ks := open(t, b)
		s, err := ks.Signer(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject:            pkix.Name{CommonName: "conformance"},
			SignatureAlgorithm: x509.ECDSAWithSHA384,
		}, s)
		if err != nil {
			t.Fatalf("CSR with backend signer: %v", err)
		}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil {
			t.Fatal(err)
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("CSR signature: %v", err)
		}
	})
	t.Run("ok/delete", func(t *testing.T) {
		ks := open(t, b)
		del, ok := ks.(keystore.KeyDeleter)
		if !ok {
			t.Fatal("backend does not implement keystore.KeyDeleter")
		}
		if err := del.DeleteKey(ctx, a); err != nil {
			t.Fatalf("DeleteKey(%s): %v", a, err)
		}
		if _, err := ks.Signer(ctx, a); !errors.Is(err, keystore.ErrKeyNotFound) {
			t.Fatalf("Signer after delete: got %v, want ErrKeyNotFound", err)
		}
		if err := del.DeleteKey(ctx, a); !errors.Is(err, keystore.ErrKeyNotFound) {
			t.Fatalf("second DeleteKey: got %v, want ErrKeyNotFound", err)
		}
		sb, err := ks.Signer(ctx, bb)
		if err != nil {
			t.Fatalf("other key gone after deleting the first: %v", err)
		}
		verify(t, sb, crypto.SHA384)
		if err := del.DeleteKey(ctx, bb); err != nil {
			t.Fatalf("DeleteKey(%s): %v", bb, err)
		}
	})
	t.Run("ok/recreate-after-delete", func(t *testing.T) {
		ks := open(t, b)
		s, err := ks.CreateKey(ctx, a)
		if err != nil {
			t.Fatalf("CreateKey after delete: %v", err)
		}
		if pubA.Equal(s.Public()) {
			t.Fatal("recreated key equals the deleted one")
		}
		if err := ks.(keystore.KeyDeleter).DeleteKey(ctx, a); err != nil {
			t.Fatal(err)
		}
	})
}

func open(t *testing.T, b Backend) keystore.KeyStore {
	t.Helper()
	ks := b.Open(t)
	t.Cleanup(func() {
		if err := ks.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return ks
}

func mustP384(t *testing.T, pub crypto.PublicKey) *ecdsa.PublicKey {
	t.Helper()
	if !keystore.IsP384(pub) {
		t.Fatalf("public key is %T, want ECDSA P-384", pub)
	}
	return pub.(*ecdsa.PublicKey)
}

// verify signs a digest of the given hash and checks it with ecdsa.VerifyASN1.
func verify(t *testing.T, s crypto.Signer, h crypto.Hash) {
	t.Helper()
	var d []byte
	switch h {
	case crypto.SHA384:
		x := sha512.Sum384([]byte("gwagent conformance"))
		d = x[:]
	case crypto.SHA256:
		x := sha256.Sum256([]byte("gwagent conformance"))
		d = x[:]
	}
	sig, err := s.Sign(rand.Reader, d, h)
	if err != nil {
		t.Fatalf("Sign(%v): %v", h, err)
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d, sig) {
		t.Fatalf("Sign(%v): signature does not verify with ecdsa.VerifyASN1", h)
	}
}
