package provisioning

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"slices"
	"time"
)

// clockSkew is how far ahead of our clock a certificate's notBefore may be
// before we blame the clock rather than the issuer (real CAs back-date a
// little; a device clock may run a little slow).
const clockSkew = 5 * time.Minute

// ValidateChain checks an issued chain before anything is stored:
//   - the leaf's public key is ours (pub),
//   - the leaf's subject CN is cn, the one the CSR asked for: the
//     registration id from DPS (even when DPS assigns another device id),
//     the device id from the hub's renewal API,
//   - the leaf allows TLS client authentication (clientAuth EKU, or no EKU
//     list); as in Azure, intermediates need not carry that EKU,
//   - the chain verifies, each certificate signed by the next, up to the
//     last one, which must be a self-signed root — or, when anchors is
//     non-nil, up to one of those roots,
//   - every certificate is valid at now, with a clock error named as such.
//
// Errors wrap ErrBadChain and say what is wrong.
func ValidateChain(chain []*x509.Certificate, pub crypto.PublicKey, cn string, now time.Time, anchors *x509.CertPool) error {
	if len(chain) == 0 {
		return fmt.Errorf("%w: empty chain", ErrBadChain)
	}
	leaf := chain[0]
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if k, ok := leaf.PublicKey.(equaler); !ok || !k.Equal(pub) {
		return fmt.Errorf("%w: the issued certificate (serial %s) is for a different key than the one we sent in the CSR", ErrBadChain, FormatSerial(leaf.SerialNumber))
	}
	if leaf.Subject.CommonName != cn {
		return fmt.Errorf("%w: certificate CN %q is not %q, the name our CSR asked for", ErrBadChain, leaf.Subject.CommonName, cn)
	}
	if len(leaf.ExtKeyUsage)+len(leaf.UnknownExtKeyUsage) > 0 && !slices.ContainsFunc(leaf.ExtKeyUsage, func(u x509.ExtKeyUsage) bool {
		return u == x509.ExtKeyUsageClientAuth || u == x509.ExtKeyUsageAny
	}) {
		return fmt.Errorf("%w: the issued certificate (serial %s) does not allow TLS client authentication (no clientAuth extended key usage)", ErrBadChain, leaf.SerialNumber.Text(16))
	}
	if err := checkDates(leaf, now); err != nil {
		return fmt.Errorf("%w: %w", ErrBadChain, err)
	}
	roots := anchors
	inter := x509.NewCertPool()
	last := len(chain)
	if roots == nil {
		root := chain[len(chain)-1]
		if len(chain) < 2 || root.CheckSignatureFrom(root) != nil {
			return fmt.Errorf("%w: the chain does not end with a self-signed root certificate (last: %q)", ErrBadChain, root.Subject)
		}
		roots = x509.NewCertPool()
		roots.AddCert(root)
		last = len(chain) - 1
	}
	for _, c := range chain[1:last] {
		inter.AddCert(c)
	}
	at := now
	if at.Before(leaf.NotBefore) { // within clockSkew, checked above
		at = leaf.NotBefore
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   at,
		// The leaf's EKU is checked above; crypto/x509 would also demand
		// clientAuth of every intermediate that lists EKUs, which Azure
		// does not.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("%w: the chain does not verify: %v", ErrBadChain, err)
	}
	return nil
}

func checkDates(c *x509.Certificate, now time.Time) error {
	if now.Add(clockSkew).Before(c.NotBefore) {
		return fmt.Errorf("certificate %q valid from %s but our clock says %s; the device clock is probably wrong (is time synchronised?)",
			c.Subject.CommonName, c.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !now.Before(c.NotAfter) {
		return fmt.Errorf("certificate %q expired at %s (now %s)", c.Subject.CommonName, c.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// CheckValidity reports, with a clock hint, whether c is valid at now.
func CheckValidity(c *x509.Certificate, now time.Time) error { return checkDates(c, now) }
