package provisioning

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

// testCA is a two-level issuing hierarchy made in the test (root -> issuing
// CA), like azsim's, to issue leaves for chain validation tests.
type testCA struct {
	root, issuing       *x509.Certificate
	rootKey, issuingKey *ecdsa.PrivateKey
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	ca := &testCA{}
	ca.rootKey, _ = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	ca.issuingKey, _ = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	now := time.Now()
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	ca.root = mustCert(t, rootTmpl, rootTmpl, &ca.rootKey.PublicKey, ca.rootKey)
	issTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name + " issuing"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	ca.issuing = mustCert(t, issTmpl, ca.root, &ca.issuingKey.PublicKey, ca.rootKey)
	return ca
}

func mustCert(t testing.TB, tmpl, parent *x509.Certificate, pub any, key *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// issue returns leaf, issuing, root for pub with CN cn valid [nb, na).
func (ca *testCA) issue(t testing.TB, pub any, cn string, nb, na time.Time) []*x509.Certificate {
	t.Helper()
	leaf := mustCert(t, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: nb, NotAfter: na, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, ca.issuing, pub, ca.issuingKey)
	return []*x509.Certificate{leaf, ca.issuing, ca.root}
}

func TestValidateChain(t *testing.T) {
	ca, other := newTestCA(t, "azsim"), newTestCA(t, "foreign")
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	now := time.Now()
	good := func() []*x509.Certificate {
		return ca.issue(t, &key.PublicKey, "dev-1", now.Add(-time.Minute), now.Add(time.Hour))
	}
	// EKU variants: an intermediate restricted to serverAuth (Azure accepts
	// it, crypto/x509's default check would not), a leaf without clientAuth,
	// a leaf without any EKU list.
	serverOnly := newTestCA(t, "eku")
	interTmpl := &x509.Certificate{SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "eku issuing"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	serverOnly.issuing = mustCert(t, interTmpl, serverOnly.root, &serverOnly.issuingKey.PublicKey, serverOnly.rootKey)
	leafWith := func(eku []x509.ExtKeyUsage) []*x509.Certificate {
		leaf := mustCert(t, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "dev-1"},
			NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: eku}, ca.issuing, &key.PublicKey, ca.issuingKey)
		return []*x509.Certificate{leaf, ca.issuing, ca.root}
	}
	anchors := x509.NewCertPool()
	anchors.AddCert(ca.root)
	foreignAnchors := x509.NewCertPool()
	foreignAnchors.AddCert(other.root)

	tests := []struct {
		name    string
		chain   []*x509.Certificate
		now     time.Time
		anchors *x509.CertPool
		want    string
	}{
		{"ok/self-contained", good(), now, nil, ""},
		{"ok/pinned-root", good(), now, anchors, ""},
		{"ok/notbefore-slightly-ahead", ca.issue(t, &key.PublicKey, "dev-1", now.Add(2*time.Minute), now.Add(time.Hour)), now, nil, ""},
		{"fail/other-key", ca.issue(t, &otherKey.PublicKey, "dev-1", now.Add(-time.Minute), now.Add(time.Hour)), now, nil, "different key"},
		{"fail/wrong-cn", ca.issue(t, &key.PublicKey, "dev-2", now.Add(-time.Minute), now.Add(time.Hour)), now, nil, `CN "dev-2"`},
		{"fail/expired", ca.issue(t, &key.PublicKey, "dev-1", now.Add(-2*time.Hour), now.Add(-time.Hour)), now, nil, "expired"},
		{"fail/clock-1970", good(), time.Unix(0, 0), nil, "clock"},
		{"fail/no-root", good()[:2], now, nil, "self-signed root"},
		{"fail/leaf-only", good()[:1], now, nil, "self-signed root"},
		{"fail/foreign-root", append(good()[:2], other.root), now, nil, "does not verify"},
		{"fail/pinned-other-root", good(), now, foreignAnchors, "does not verify"},
		{"ok/intermediate-without-clientauth-eku", serverOnly.issue(t, &key.PublicKey, "dev-1", now.Add(-time.Minute), now.Add(time.Hour)), now, nil, ""},
		{"ok/leaf-without-eku-list", leafWith(nil), now, nil, ""},
		{"fail/leaf-without-clientauth", leafWith([]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}), now, nil, "client authentication"},
		{"fail/missing-intermediate", []*x509.Certificate{good()[0], ca.root}, now, nil, "does not verify"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateChain(tc.chain, &key.PublicKey, "dev-1", tc.now, tc.anchors)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrBadChain) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrBadChain mentioning %q", err, tc.want)
			}
		})
	}
}

func TestDecodeChain(t *testing.T) {
	ca := newTestCA(t, "azsim")
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	chain := ca.issue(t, &key.PublicKey, "dev-1", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	var b64, pems []string
	for _, c := range chain {
		b64 = append(b64, base64.StdEncoding.EncodeToString(c.Raw))
		pems = append(pems, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	for name, in := range map[string][]string{"ok/base64-der": b64, "ok/pem": pems, "ok/pem-bundle-in-one": {strings.Join(pems, "")}} {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeChain(in)
			if err != nil || len(got) != 3 || !got[0].Equal(chain[0]) || !got[2].Equal(chain[2]) {
				t.Fatalf("DecodeChain: %v (%d certs)", err, len(got))
			}
		})
	}
	for name, in := range map[string][]string{
		"fail/empty": nil, "fail/garbage": {"%%%"}, "fail/not-a-cert": {base64.StdEncoding.EncodeToString([]byte("hello"))},
		"fail/pem-key": {"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := DecodeChain(in); !errors.Is(err, ErrBadChain) {
				t.Fatalf("got %v, want ErrBadChain", err)
			}
		})
	}
}
