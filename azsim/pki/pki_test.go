package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
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
		if !q.Issuing.Cert.Equal(p.Issuing.Cert) || !q.ServerRSA.Leaf.Equal(p.ServerRSA.Leaf) || !q.ServerECDSA.Leaf.Equal(p.ServerECDSA.Leaf) || !q.OnboardRoot.Cert.Equal(p.OnboardRoot.Cert) {
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
		if len(m) != 10 {
			t.Errorf("%d key files, want 10", len(m))
		}
	})
	t.Run("ok/server chains are root, intermediate, leaf like Azure's", func(t *testing.T) {
		bundle, err := os.ReadFile(p.TrustBundle())
		if err != nil {
			t.Fatal(err)
		}
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(bundle)
		for _, tc := range []struct {
			key    string
			algo   x509.PublicKeyAlgorithm
			bits   int
			rootCN string
		}{{ServerKeyRSA, x509.RSA, 2048, "azsim Global Root G2"}, {ServerKeyECDSA, x509.ECDSA, 256, "azsim Server CA"}} {
			conf, err := p.ServerTLS(tc.key, true)
			if err != nil {
				t.Fatal(err)
			}
			sc := conf.Certificates[0]
			if len(sc.Certificate) != 2 {
				t.Fatalf("%s: %d certificates served, want leaf and intermediate", tc.key, len(sc.Certificate))
			}
			inter, _ := x509.ParseCertificate(sc.Certificate[1])
			ip := x509.NewCertPool()
			ip.AddCert(inter)
			if sc.Leaf.PublicKeyAlgorithm != tc.algo {
				t.Errorf("%s: leaf key %v", tc.key, sc.Leaf.PublicKeyAlgorithm)
			}
			if k, ok := sc.Leaf.PublicKey.(*rsa.PublicKey); ok && k.N.BitLen() != tc.bits {
				t.Errorf("%s: RSA key of %d bits", tc.key, k.N.BitLen())
			}
			for _, n := range []string{"localhost", "127.0.0.1", "::1", "gw.example", "10.0.0.5"} {
				chains, err := sc.Leaf.Verify(x509.VerifyOptions{DNSName: n, Roots: roots, Intermediates: ip})
				if err != nil {
					t.Errorf("%s %s: %v", tc.key, n, err)
					continue
				}
				if len(chains[0]) != 3 || chains[0][2].Subject.CommonName != tc.rootCN {
					t.Errorf("%s: chain of %d to %q, want 3 to %q", tc.key, len(chains[0]), chains[0][len(chains[0])-1].Subject.CommonName, tc.rootCN)
				}
			}
			if len(conf.ClientCAs.Subjects()) != 2 { //nolint:staticcheck // the list is what a CertificateRequest carries
				t.Errorf("%s: certificate_authorities has %d names, want the 2 server roots", tc.key, len(conf.ClientCAs.Subjects()))
			}
		}
		if _, err := p.ServerTLS("dsa", true); err == nil {
			t.Error("unknown server key type accepted")
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
