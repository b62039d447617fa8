package provisioning

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"
)

// A serial whose first byte is below 0x10 keeps its leading zero, in the
// stored identity too (openssl prints it as 0A0B0C).
func TestSerialInFull(t *testing.T) {
	ca := newTestCA(t, "azsim")
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	leaf := mustCert(t, &x509.Certificate{SerialNumber: big.NewInt(0x0a0b0c), Subject: pkix.Name{CommonName: "dev-1"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, ca.issuing, &key.PublicKey, ca.issuingKey)
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Save(&Identity{KeyURI: "file:/k", DeviceID: "dev-1", Via: "dps"}, []*x509.Certificate{leaf, ca.issuing, ca.root}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Current()
	if err != nil {
		t.Fatal(err)
	}
	if got.Serial != "0a0b0c" {
		t.Fatalf("stored serial %q, want 0a0b0c", got.Serial)
	}
	for _, c := range []struct {
		n    *big.Int
		want string
	}{{big.NewInt(0), "00"}, {big.NewInt(0xff), "ff"}, {big.NewInt(0x100), "0100"}} {
		if got := FormatSerial(c.n); got != c.want {
			t.Errorf("FormatSerial(%v) = %q, want %q", c.n, got, c.want)
		}
	}
}
