#!/usr/bin/perl
# Verify the DKIM signatures of the message on stdin with Perl's Mail::DKIM (an
# implementation independent of dkimpy), asking the DNS server at 127.0.0.1:PORT.
# Prints one line per signature: domain selector algorithm result.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

my $port = shift or die "usage: dkim_verify.pl DNS_PORT < message\n";
my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                       recurse => 1, udp_timeout => 5, tcp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s\n", $sig->domain, $sig->selector, $sig->algorithm, $sig->result_detail;
}
