// Package pki is azsim's certificate authority set, created on first start
// in the state directory and reused afterwards:
//
//   - the TLS server chains of DPS and the hub, shaped like Azure's public
//     endpoints: root, intermediate, server certificate. The RSA-2048 chain
//     (like DigiCert Global Root G2 -> Microsoft Azure RSA TLS Issuing CA ->
//     *.azure-devices.net) is the default; an ECDSA chain is the option;
//   - the onboarding supply chain: a company root and a factory intermediate
//     that signs devices' onboarding certificates (FactorySign);
//   - the ADR-style issuing hierarchy, a root and an issuing CA (ECDSA P-384,
//     SHA-384), that signs operational certificates (Issue, identity.Issuer);
//   - trust-bundle.pem, both server roots, for agents and SDKs.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/gwagent/gwagent/azsim/identity"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// CA is a certificate with its key.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// PKI is azsim's set of CAs. It is read-only after Load, so its methods
// are safe for concurrent use.
type PKI struct {
	dir string
	now func() time.Time

	// ServerCA is the ECDSA server root (kept under its old name so
	// existing state directories keep their trust bundle), ServerRSARoot
	// the RSA one. Server is the chain ServerTLS serves by default (RSA).
	ServerCA      CA
	ServerRSARoot CA
	ServerRSA     tls.Certificate // leaf, intermediate
	ServerECDSA   tls.Certificate // leaf, intermediate
	Server        tls.Certificate
	OnboardRoot   CA
	Factory       CA
	IssuingRoot   CA
	Issuing       CA
}

// File names under Dir.
const (
	TrustBundleFile = "trust-bundle.pem"
	OnboardRootFile = "onboarding-root.crt"
	IssuingRootFile = "issuing-root.crt"
)

var _ identity.Issuer = (*PKI)(nil)

// Server key types for ServerTLS.
const (
	ServerKeyRSA   = "rsa"
	ServerKeyECDSA = "ecdsa"
)

// Load opens the PKI in dir, creating what is missing. names are extra DNS
// names or IPs for the server certificates; localhost, 127.0.0.1 and ::1 are
// always in them. now may be nil (time.Now).
func Load(dir string, names []string, now func() time.Time) (*PKI, error) {
	if now == nil {
		now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	p := &PKI{dir: dir, now: now}
	ten := 10 * 365 * 24 * time.Hour
	var err error
	if p.ServerCA, err = p.ca("server-ca", "azsim Server CA", nil, ten, ecKey(elliptic.P256())); err != nil {
		return nil, err
	}
	if p.ServerRSARoot, err = p.ca("server-rsa-root", "azsim Global Root G2", nil, ten, rsaKey); err != nil {
		return nil, err
	}
	if p.OnboardRoot, err = p.ca("onboarding-root", "azsim Company Root CA", nil, ten, ecKey(elliptic.P384())); err != nil {
		return nil, err
	}
	if p.Factory, err = p.ca("factory-ca", "azsim Factory Intermediate CA", &p.OnboardRoot, ten/2, ecKey(elliptic.P384())); err != nil {
		return nil, err
	}
	if p.IssuingRoot, err = p.ca("issuing-root", "azsim ADR Root CA", nil, ten, ecKey(elliptic.P384())); err != nil {
		return nil, err
	}
	if p.Issuing, err = p.ca("issuing-ca", "azsim ADR Issuing CA", &p.IssuingRoot, ten/2, ecKey(elliptic.P384())); err != nil {
		return nil, err
	}
	rsaCA, err := p.ca("server-rsa-ca", "azsim RSA TLS Issuing CA 01", &p.ServerRSARoot, ten/2, rsaKey)
	if err != nil {
		return nil, err
	}
	ecCA, err := p.ca("server-ecdsa-ca", "azsim ECC TLS Issuing CA 01", &p.ServerCA, ten/2, ecKey(elliptic.P384()))
	if err != nil {
		return nil, err
	}
	if p.ServerRSA, err = p.serverCert("server-rsa", rsaCA, rsaKey, names); err != nil {
		return nil, err
	}
	if p.ServerECDSA, err = p.serverCert("server-ecdsa", ecCA, ecKey(elliptic.P256()), names); err != nil {
		return nil, err
	}
	p.Server = p.ServerRSA
	if err := atomicfile.Write(p.TrustBundle(), pemCerts(p.ServerRSARoot.Cert, p.ServerCA.Cert), 0o644); err != nil {
		return nil, fmt.Errorf("pki: trust bundle: %w", err)
	}
	return p, nil
}

// Dir is the PKI's directory.
func (p *PKI) Dir() string { return p.dir }

// TrustBundle is the path of the PEM file agents and SDKs trust.
func (p *PKI) TrustBundle() string { return filepath.Join(p.dir, TrustBundleFile) }

// ServerTLS is a TLS configuration carrying the server chain of the given
// key type (ServerKeyRSA, the default when empty, or ServerKeyECDSA).
// Its ClientCAs names the server roots, so a CertificateRequest carries a
// non-empty certificate_authorities list that names none of the devices'
// CAs, as a real service's may: clients must send their chain anyway.
// With caList false the list is empty.
func (p *PKI) ServerTLS(key string, caList bool) (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	switch key {
	case "", ServerKeyRSA:
		c.Certificates = []tls.Certificate{p.ServerRSA}
	case ServerKeyECDSA:
		c.Certificates = []tls.Certificate{p.ServerECDSA}
	default:
		return nil, fmt.Errorf("pki: server key type %q: use %q (as Azure) or %q", key, ServerKeyRSA, ServerKeyECDSA)
	}
	if caList {
		c.ClientCAs = x509.NewCertPool()
		c.ClientCAs.AddCert(p.ServerRSARoot.Cert)
		c.ClientCAs.AddCert(p.ServerCA.Cert)
	}
	return c, nil
}

// OnboardingRoots is the pool DPS verifies onboarding chains against.
func (p *PKI) OnboardingRoots() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.OnboardRoot.Cert)
	return pool
}

// ca loads name.crt/name.key or creates them, signed by parent (nil: self).
func (p *PKI) ca(name, cn string, parent *CA, life time.Duration, newKey func() (crypto.Signer, error)) (CA, error) {
	certPath, keyPath := filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	if c, err := loadPair(certPath, keyPath); err == nil {
		return c, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return CA{}, fmt.Errorf("pki: %s: %w (delete the state directory's pki/ to start over)", name, err)
	}
	key, err := newKey()
	if err != nil {
		return CA{}, err
	}
	now := p.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"azsim"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(life),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	signer := CA{Key: key}
	if parent != nil {
		signer = *parent
		tmpl.MaxPathLenZero = true
	}
	cert, err := create(tmpl, signer.Cert, key.Public(), signer.Key)
	if err != nil {
		return CA{}, fmt.Errorf("pki: %s: %w", name, err)
	}
	if err := savePair(certPath, keyPath, cert, key); err != nil {
		return CA{}, fmt.Errorf("pki: %s: %w", name, err)
	}
	return CA{Cert: cert, Key: key}, nil
}

// serverCert loads the server certificate name.crt, or issues a new one
// signed by ca if it is missing, expires within a day, or lacks one of the
// names. The chain served is leaf and intermediate, as Azure serves it.
func (p *PKI) serverCert(name string, ca CA, newKey func() (crypto.Signer, error), extra []string) (tls.Certificate, error) {
	dns, ips := []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	for _, n := range extra {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else if n != "" {
			dns = append(dns, n)
		}
	}
	certPath, keyPath := filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	if c, err := loadPair(certPath, keyPath); err == nil && covers(c.Cert, dns, ips) && p.now().Add(24*time.Hour).Before(c.Cert.NotAfter) &&
		bytes.Equal(c.Cert.RawIssuer, ca.Cert.RawSubject) {
		return tls.Certificate{Certificate: [][]byte{c.Cert.Raw, ca.Cert.Raw}, PrivateKey: c.Key, Leaf: c.Cert}, nil
	}
	key, err := newKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	now := p.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: dns[0], Organization: []string{"azsim"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(2 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	if _, ok := key.(*rsa.PrivateKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	cert, err := create(tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: server certificate: %w", err)
	}
	if err := savePair(certPath, keyPath, cert, key); err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{cert.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: cert}, nil
}

func ecKey(c elliptic.Curve) func() (crypto.Signer, error) {
	return func() (crypto.Signer, error) { return ecdsa.GenerateKey(c, rand.Reader) }
}

func rsaKey() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) }

func covers(c *x509.Certificate, dns []string, ips []net.IP) bool {
	for _, d := range dns {
		if !slices.Contains(c.DNSNames, d) {
			return false
		}
	}
	for _, ip := range ips {
		if !slices.ContainsFunc(c.IPAddresses, ip.Equal) {
			return false
		}
	}
	return true
}

// FactorySign plays the factory CA: it signs a device's onboarding CSR (CN =
// registration id) and returns the leaf and the factory intermediate, the
// chain a device presents to DPS.
func (p *PKI) FactorySign(csr *x509.CertificateRequest, lifetime time.Duration) ([]*x509.Certificate, error) {
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("factory-sign: the CSR's signature does not verify: %w", err)
	}
	cn := csr.Subject.CommonName
	if cn == "" {
		return nil, errors.New("factory-sign: the CSR has no subject CN; it must be the device's registration id")
	}
	if lifetime <= 0 {
		lifetime = 5 * 365 * 24 * time.Hour
	}
	leaf, err := p.sign(p.Factory, csr.PublicKey, cn, lifetime, time.Hour)
	if err != nil {
		return nil, fmt.Errorf("factory-sign: %w", err)
	}
	return []*x509.Certificate{leaf, p.Factory.Cert}, nil
}

// Issue signs an operational certificate (identity.Issuer): leaf, issuing
// CA, root. Like real CAs, notBefore is back-dated for clock skew: 5 minutes,
// or a tenth of the lifetime when that is shorter, so that very short test
// lifetimes keep their proportions.
func (p *PKI) Issue(csr *x509.CertificateRequest, cn string, lifetime time.Duration) ([]*x509.Certificate, error) {
	if lifetime <= 0 {
		return nil, errors.New("issue: lifetime must be positive")
	}
	leaf, err := p.sign(p.Issuing, csr.PublicKey, cn, lifetime, min(5*time.Minute, lifetime/10))
	if err != nil {
		return nil, fmt.Errorf("issue: %w", err)
	}
	return []*x509.Certificate{leaf, p.Issuing.Cert, p.IssuingRoot.Cert}, nil
}

// IssuingCAs are the CAs the hub trusts for issued certificates.
func (p *PKI) IssuingCAs() []*x509.Certificate {
	return []*x509.Certificate{p.Issuing.Cert, p.IssuingRoot.Cert}
}

func (p *PKI) sign(ca CA, pub crypto.PublicKey, cn string, lifetime, backdate time.Duration) (*x509.Certificate, error) {
	now := p.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return create(tmpl, ca.Cert, pub, ca.Key)
}

func create(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	if parent == nil {
		parent = tmpl
	}
	if ek, ok := key.Public().(*ecdsa.PublicKey); ok && ek.Curve == elliptic.P384() {
		tmpl.SignatureAlgorithm = x509.ECDSAWithSHA384
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n.Add(n, big.NewInt(1))
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// PEM encodes certificates as PEM, in order.
func PEM(certs ...*x509.Certificate) []byte { return pemCerts(certs...) }

func savePair(certPath, keyPath string, cert *x509.Certificate, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	return atomicfile.Write(certPath, pemCerts(cert), 0o644)
}

func loadPair(certPath, keyPath string) (CA, error) {
	cb, err := os.ReadFile(certPath)
	if err != nil {
		return CA{}, err
	}
	kb, err := os.ReadFile(keyPath)
	if err != nil {
		return CA{}, err
	}
	cblk, _ := pem.Decode(cb)
	kblk, _ := pem.Decode(kb)
	if cblk == nil || kblk == nil {
		return CA{}, fmt.Errorf("%s or %s is not PEM", certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(cblk.Bytes)
	if err != nil {
		return CA{}, err
	}
	k, err := x509.ParsePKCS8PrivateKey(kblk.Bytes)
	if err != nil {
		return CA{}, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return CA{}, fmt.Errorf("%s: not a signing key", keyPath)
	}
	return CA{Cert: cert, Key: signer}, nil
}
