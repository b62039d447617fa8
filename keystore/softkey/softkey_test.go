package softkey_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/keystoretest"
	"github.com/gwagent/gwagent/keystore/softkey"
)

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	keystoretest.Run(t, keystoretest.Backend{
		Open: func(t *testing.T) keystore.KeyStore { return softkey.New() },
		KeyURI: func(t *testing.T, name string) *keystore.URI {
			return keystore.MustParse("file:" + filepath.Join(dir, "keys", name+".key"))
		},
	})
}

func TestKeyFile(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr error
	}{
		{"ok/created-0600", func(t *testing.T, p string) {
			if _, err := softkey.New().CreateKey(ctx, keystore.MustParse("file:"+p)); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Fatalf("key file mode %04o, want 0600", st.Mode().Perm())
			}
		}, nil},
		{"fail/group-readable", func(t *testing.T, p string) {
			if _, err := softkey.New().CreateKey(ctx, keystore.MustParse("file:"+p)); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, 0o640)
		}, keystore.ErrInsecureKeyFile},
		{"fail/world-readable", func(t *testing.T, p string) {
			if _, err := softkey.New().CreateKey(ctx, keystore.MustParse("file:"+p)); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, 0o604)
		}, keystore.ErrInsecureKeyFile},
		{"fail/p256-key", func(t *testing.T, p string) {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			der, _ := x509.MarshalPKCS8PrivateKey(k)
			os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
		}, keystore.ErrUnsupportedCurve},
		{"fail/missing", func(t *testing.T, p string) {}, keystore.ErrKeyNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "device.key")
			tc.prepare(t, p)
			_, err := softkey.New().Signer(ctx, keystore.MustParse("file:"+p))
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Signer: got %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func TestGarbageFileIsClearError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "device.key")
	os.WriteFile(p, []byte("not a key"), 0o600)
	_, err := softkey.New().Signer(context.Background(), keystore.MustParse("file:"+p))
	if err == nil || !containsAll(err.Error(), p, "not a gwagent key") {
		t.Fatalf("got %v, want an error naming the file and the problem", err)
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}
