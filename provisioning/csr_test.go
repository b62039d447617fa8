package provisioning_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

func TestCSR(t *testing.T) {
	k384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	k256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tests := []struct {
		name    string
		key     *ecdsa.PrivateKey
		cn      string
		wantErr string
	}{
		{"ok/p384", k384, "gw-0001", ""},
		{"ok/all-allowed-chars", k384, "Gw.01_a:b-", ""},
		{"ok/64-chars", k384, strings.Repeat("a", 64), ""},
		{"fail/p256", k256, "gw-0001", "P-384"},
		{"fail/empty-cn", k384, "", "empty"},
		{"fail/65-chars", k384, strings.Repeat("a", 65), "at most 64"},
		{"fail/space", k384, "gw 01", "character"},
		{"fail/ends-with-dot", k384, "gw.", "ends with"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			der, err := provisioning.CSR(tc.key, tc.cn)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want error containing %q", err, tc.wantErr)
				}
				if tc.key == k256 && !errors.Is(err, keystore.ErrUnsupportedCurve) {
					t.Fatalf("P-256 key: want ErrUnsupportedCurve, got %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			csr, err := x509.ParseCertificateRequest(der)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("signature: %v", err)
			}
			if csr.SignatureAlgorithm != x509.ECDSAWithSHA384 {
				t.Fatalf("signature algorithm %v, want ECDSA-SHA384", csr.SignatureAlgorithm)
			}
			if csr.Subject.CommonName != tc.cn || len(csr.Subject.Names) != 1 {
				t.Fatalf("subject %v, want only CN=%s", csr.Subject, tc.cn)
			}
			if !tc.key.PublicKey.Equal(csr.PublicKey) {
				t.Fatal("CSR public key is not the signer's")
			}
			enc := provisioning.EncodeCSR(der)
			if strings.ContainsAny(enc, "\n\r -") {
				t.Fatalf("encoded CSR has newlines, spaces or PEM armour: %q", enc[:40])
			}
			if back, err := base64.StdEncoding.DecodeString(enc); err != nil || string(back) != string(der) {
				t.Fatal("encoded CSR is not base64 of the DER")
			}
		})
	}
}

// A registration id outside DPS's rules is named with the offending
// character as the user typed it, counted in characters: a non-ASCII letter
// used to be reported as its first UTF-8 byte ('Ã' for 'é').
func TestValidateRegistrationID(t *testing.T) {
	for _, tc := range []struct {
		name, id, want string
	}{
		{"ok/plain", "gw-0042", ""},
		{"ok/all-classes", "A.b_c:d-9", ""},
		{"ok/64-characters", strings.Repeat("a", 64), ""},
		{"fail/empty", "", "is empty"},
		{"fail/65-characters", strings.Repeat("a", 65), "is 65 characters"},
		{"fail/non-ascii-letter", "gwé-1", `character 'é' (U+00E9, not ASCII) at position 3`},
		{"fail/non-ascii-late", "gateway-ünit", `character 'ü' (U+00FC, not ASCII) at position 9`},
		{"fail/space", "gw 1", `character ' ' at position 3`},
		{"fail/slash", "a/b", `character '/' at position 2`},
		{"fail/invalid-utf8", "gw\xff1", "byte 0xff, which is not UTF-8, at position 3"},
		{"fail/bad-end", "gw.", "ends with '.'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := provisioning.ValidateRegistrationID(tc.id)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("%q: %v", tc.id, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%q: %v, want %q", tc.id, err, tc.want)
			}
		})
	}
}
