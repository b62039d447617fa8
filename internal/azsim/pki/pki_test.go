package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func csr(t *testing.T, cn string) *x509.CertificateRequest {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	r, _ := x509.ParseCertificateRequest(der)
	return r
}

func TestPKI(t *testing.T) {
	dir := t.TempDir()
	p, err := Load(dir, []string{"gw.example", "10.0.0.5"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("ok/reused after restart", func(t *testing.T) {
		q, err := Load(dir, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !q.Issuing.Cert.Equal(p.Issuing.Cert) || !q.Server.Leaf.Equal(p.Server.Leaf) || !q.OnboardRoot.Cert.Equal(p.OnboardRoot.Cert) {
			t.Fatal("a second Load created new CAs instead of reusing them")
		}
	})
	t.Run("ok/keys are 0600", func(t *testing.T) {
		m, _ := filepath.Glob(filepath.Join(dir, "*.key"))
		for _, k := range m {
			st, _ := os.Stat(k)
			if st.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %o", k, st.Mode().Perm())
			}
		}
		if len(m) != 6 {
			t.Errorf("%d key files, want 6", len(m))
		}
	})
	t.Run("ok/server certificate names", func(t *testing.T) {
		roots := x509.NewCertPool()
		roots.AddCert(p.ServerCA.Cert)
		for _, n := range []string{"localhost", "127.0.0.1", "::1", "gw.example", "10.0.0.5"} {
			if _, err := p.Server.Leaf.Verify(x509.VerifyOptions{DNSName: n, Roots: roots}); err != nil {
				t.Errorf("%s: %v", n, err)
			}
		}
	})
	t.Run("ok/factory chain reaches the onboarding root", func(t *testing.T) {
		chain, err := p.FactorySign(csr(t, "dev-1"), 0)
		if err != nil {
			t.Fatal(err)
		}
		inter := x509.NewCertPool()
		inter.AddCert(chain[1])
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: p.OnboardingRoots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatal(err)
		}
		if chain[0].Subject.CommonName != "dev-1" {
			t.Fatalf("CN %q", chain[0].Subject.CommonName)
		}
	})
	t.Run("ok/issued chain is P-384 SHA-384 ending at the root", func(t *testing.T) {
		chain, err := p.Issue(csr(t, "dev-1"), "dev-1", 40*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(chain) != 3 || !chain[2].Equal(p.IssuingRoot.Cert) {
			t.Fatal("chain is not leaf, issuing CA, root")
		}
		for _, c := range chain {
			if c.SignatureAlgorithm != x509.ECDSAWithSHA384 {
				t.Errorf("%s signed with %v", c.Subject.CommonName, c.SignatureAlgorithm)
			}
		}
		if life := chain[0].NotAfter.Sub(chain[0].NotBefore); life < 40*time.Second || life > 45*time.Second {
			t.Errorf("lifetime %s: the back-dating must stay proportional for short lifetimes", life)
		}
	})
	t.Run("fail/factory rejects a CSR without CN", func(t *testing.T) {
		if _, err := p.FactorySign(csr(t, ""), 0); err == nil {
			t.Fatal("accepted")
		}
	})
}
