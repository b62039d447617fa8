package softkey

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/keystore"
)

// The key files in testdata were written by OpenSSL 3.0 (genpkey, ecparam
// -genkey, ec): what an installer may bring instead of gwagent keygen.
func TestOpenSSLKeyFiles(t *testing.T) {
	tests := []struct {
		file    string
		wantErr error // nil: a P-384 key, the same one crypto/x509 reads
	}{
		{"openssl-p384-pkcs8.pem", nil},
		{"openssl-p384-sec1.pem", nil},
		{"openssl-p384-sec1-params.pem", nil},
		{"openssl-p256-pkcs8.pem", keystore.ErrUnsupportedCurve},
		{"openssl-rsa-pkcs8.pem", keystore.ErrUnsupportedCurve},
		{"openssl-ed25519-pkcs8.pem", keystore.ErrUnsupportedCurve},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			k, err := parse(data)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), "gwagent keygen") {
					t.Fatalf("parse: %v, want %v saying what to do", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !k.Equal(stdlibKey(t, data)) {
				t.Fatal("parse and crypto/x509 read different keys")
			}
		})
	}
}

// stdlibKey is the key crypto/x509 reads from a PEM file's last block.
func stdlibKey(t *testing.T, data []byte) *ecdsa.PrivateKey {
	t.Helper()
	var block *pem.Block
	for b, rest := pem.Decode(data); b != nil; b, rest = pem.Decode(rest) {
		block = b
	}
	var key any
	var err error
	if block.Type == "EC PRIVATE KEY" {
		key, err = x509.ParseECPrivateKey(block.Bytes)
	} else {
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		t.Fatal(err)
	}
	return key.(*ecdsa.PrivateKey)
}

// What the store writes, crypto/x509 and OpenSSL read; what crypto/x509
// writes (its PKCS #8 leaves the curve out of the inner key), the store reads.
func TestPKCS8BothWays(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, err := marshalPKCS8(k)
	if err != nil {
		t.Fatal(err)
	}
	got, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil || !k.Equal(got) {
		t.Fatalf("crypto/x509 reads %v, %v", got, err)
	}
	std, _ := x509.MarshalPKCS8PrivateKey(k)
	if bytes.Equal(std, der) {
		t.Log("crypto/x509's encoding is now the same as the store's")
	}
	for name, d := range map[string][]byte{"store": der, "crypto/x509": std} {
		if back, err := parsePKCS8(d); err != nil || !k.Equal(back) {
			t.Fatalf("%s's PKCS #8: parsePKCS8 = %v, %v", name, back, err)
		}
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "k.pem")
	os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	if out, err := openssl(t, "pkey", "-in", p, "-noout", "-text"); err != nil || !strings.Contains(out, "NIST CURVE: P-384") {
		t.Fatalf("openssl pkey: %v\n%s", err, out)
	}
}

// A scalar written without its leading zero bytes (or with one too many)
// is the same key; one that is too long, zero, not below the order, or whose
// public key is another's, is refused.
func TestSEC1Scalar(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	d, _ := k.Bytes()
	pub, _ := k.PublicKey.Bytes()
	otherPub, _ := other.PublicKey.Bytes()
	small := make([]byte, 48)
	small[47] = 7
	smallKey, err := ecdsa.ParseRawPrivateKey(elliptic.P384(), small)
	if err != nil {
		t.Fatal(err)
	}
	order := elliptic.P384().Params().N.Bytes()
	enc := func(scalar, pub []byte) []byte {
		der, err := asn1.Marshal(ecPrivateKey{Version: 1, PrivateKey: scalar, NamedCurveOID: oidP384,
			PublicKey: asn1.BitString{Bytes: pub, BitLength: 8 * len(pub)}})
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	tests := []struct {
		name string
		der  []byte
		want *ecdsa.PrivateKey // nil: refused
	}{
		{"as written", enc(d, pub), k},
		{"no public key", enc(d, nil), k},
		{"leading zero added", enc(append([]byte{0}, d...), pub), k},
		{"leading zeros dropped", enc([]byte{7}, nil), smallKey},
		{"49 bytes", enc(append([]byte{1}, d...), nil), nil},
		{"zero", enc([]byte{0}, nil), nil},
		{"the order", enc(order, nil), nil},
		{"another key's public key", enc(d, otherPub), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseSEC1(tc.der, nil)
			if tc.want == nil {
				if err == nil {
					t.Fatal("parseSEC1 accepted it")
				}
				return
			}
			if err != nil || !tc.want.Equal(got) {
				t.Fatalf("parseSEC1 = %v, %v", got, err)
			}
		})
	}
	if _, err := parseSEC1(enc(d, nil), asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}); !errors.Is(err, keystore.ErrUnsupportedCurve) {
		t.Fatalf("a key in a P-256 PKCS #8 wrapper: %v, want it refused as not P-384", err)
	}
}

// openssl runs the openssl command, which make test installs.
func openssl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("openssl", args...).CombinedOutput()
	return string(out), err
}

// FuzzKeyFile checks the store's parser against crypto/x509's: whatever it
// accepts, crypto/x509 reads as the same P-384 key, and every P-384 key
// crypto/x509 reads it accepts, unless the file's public key is not the
// private key's (which crypto/x509 does not check).
func FuzzKeyFile(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, _ := marshalPKCS8(k)
	std, _ := x509.MarshalPKCS8PrivateKey(k)
	sec1, _ := x509.MarshalECPrivateKey(k)
	f.Add([]byte("PRIVATE KEY"), der)
	f.Add([]byte("PRIVATE KEY"), std)
	f.Add([]byte("EC PRIVATE KEY"), sec1)
	files, _ := filepath.Glob("testdata/*.pem")
	for _, file := range files {
		data, _ := os.ReadFile(file)
		for b, rest := pem.Decode(data); b != nil; b, rest = pem.Decode(rest) {
			f.Add([]byte(b.Type), b.Bytes)
		}
	}
	f.Fuzz(func(t *testing.T, typ, der []byte) {
		var ours *ecdsa.PrivateKey
		var err error
		var theirs any
		var stdErr error
		switch string(typ) {
		case "PRIVATE KEY":
			ours, err = parsePKCS8(der)
			theirs, stdErr = x509.ParsePKCS8PrivateKey(der)
		case "EC PRIVATE KEY":
			ours, err = parseSEC1(der, nil)
			theirs, stdErr = x509.ParseECPrivateKey(der)
		default:
			return
		}
		std, stdOK := theirs.(*ecdsa.PrivateKey)
		stdOK = stdOK && stdErr == nil && std.Curve == elliptic.P384()
		if err == nil {
			if !stdOK || !ours.Equal(std) {
				t.Fatalf("accepted a key crypto/x509 reads as %T %v", theirs, stdErr)
			}
			return
		}
		if stdOK && !strings.Contains(err.Error(), "does not belong to its private key") {
			t.Fatalf("refused a P-384 key crypto/x509 reads: %v", err)
		}
	})
}
