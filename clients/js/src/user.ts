/**
 * {@link User}: one user's latest known state, with the hosted SDK's names. The client keeps one
 * `User` object per identity, so a reference taken once always shows the latest state, and
 * the same object is handed out again after an unsubscribe and a new subscribe.
 */

import { Emitter } from "./emitter.js";
import type { UpdateReason, WireUser } from "./protocol.js";

/** The payload of a user's `updated` event and of the client's `userUpdated`. */
export interface UserUpdatedEvent {
  user: User;
  /** What changed, in the protocol's order. */
  updateReasons: UpdateReason[];
}

/** The events of a {@link User}. */
export interface UserEvents {
  /** The user's friendly name, attributes or reachability changed. */
  updated: UserUpdatedEvent;
}

/** What a user needs of its client. @internal */
export interface UserOwner {
  unsubscribeUser(identity: string): Promise<void>;
}

/** The reasons that describe how `before` became `after`, in the protocol's order. */
export function reasonsBetween(before: WireUser, after: WireUser): UpdateReason[] {
  const reasons: UpdateReason[] = [];
  if (before.friendly_name !== after.friendly_name) reasons.push("friendlyName");
  if (before.attributes !== after.attributes) reasons.push("attributes");
  if (before.is_online !== after.is_online) reasons.push("reachabilityOnline");
  if (before.is_notifiable !== after.is_notifiable) reasons.push("reachabilityNotifiable");
  return reasons;
}

function parseAttributes(text: string): Record<string, unknown> {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : {};
  } catch {
    return {};
  }
}

/** A user of the client's service; see the module doc. */
export class User extends Emitter<UserEvents> {
  /** The user's identity. */
  readonly identity: string;
  private wire: WireUser;
  private parsed: Record<string, unknown> | null = null;
  private subscribed: boolean;
  private readonly owner: UserOwner;

  /** @internal */
  constructor(wire: WireUser, subscribed: boolean, owner: UserOwner) {
    super();
    this.identity = wire.identity;
    this.wire = wire;
    this.subscribed = subscribed;
    this.owner = owner;
  }

  /** The friendly name, or `null` when unset. */
  get friendlyName(): string | null {
    return this.wire.friendly_name;
  }

  /** The attributes, parsed from their JSON text (`{}` when unset). */
  get attributes(): Record<string, unknown> {
    this.parsed ??= parseAttributes(this.wire.attributes);
    return this.parsed;
  }

  /**
   * Whether the user is online: `null` while the service has reachability disabled, or when
   * the user has not been online since it was last enabled.
   */
  get isOnline(): boolean | null {
    return this.wire.is_online;
  }

  /**
   * Whether the user can be reached by push: `null` while reachability is disabled, or when
   * the user never had a push registration.
   */
  get isNotifiable(): boolean | null {
    return this.wire.is_notifiable;
  }

  /**
   * When the user was last seen: while online, the time of the state the client holds; after,
   * when the user went offline. `null` whenever {@link User.isOnline} is (and from a server
   * that does not send it). A change of this time alone is no update (it has no reason).
   */
  get lastSeenAt(): Date | null {
    const seconds = this.wire.last_seen_at;
    return typeof seconds === "number" ? new Date(seconds * 1000) : null;
  }

  /** Whether the client is subscribed to this user (always `true` for the client's own). */
  get isSubscribed(): boolean {
    return this.subscribed;
  }

  /** Stops the updates of this user; the own user stays subscribed. */
  unsubscribe(): Promise<void> {
    return this.owner.unsubscribeUser(this.identity);
  }

  /** The state as the server last sent it. */
  toJSON(): WireUser {
    return { ...this.wire };
  }

  /** Stores a new state; returns what changed. @internal */
  _replace(wire: WireUser): UpdateReason[] {
    const reasons = reasonsBetween(this.wire, wire);
    if (wire.attributes !== this.wire.attributes) {
      this.parsed = null;
    }
    this.wire = wire;
    return reasons;
  }

  /** @internal */
  _setSubscribed(subscribed: boolean): void {
    this.subscribed = subscribed;
  }

  /** @internal */
  _emitUpdated(updateReasons: UpdateReason[]): void {
    this.emit("updated", { user: this, updateReasons });
  }
}
